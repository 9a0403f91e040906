"""Weight quantization schemes: frozen, versioned, serialized into the artifact per linear.

Storage convention (every scheme): unsigned integer codes q ∈ [0, 2^bits − 1] packed along the
input dimension, per (output row, group of `group_size` input columns) a scale s and a zero
point z (in code units, float so that HQQ-style fractional zeros fit), and
    w ≈ (q − z) · s.
Symmetric schemes store no zeros: z = 2^(bits−1) implicitly. The last group of a row may be
partial when group_size does not divide in_features (SmolLM2's hidden size 576 with g128).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import Registry

SCHEME_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")

QUANTIZERS: Registry = Registry("weight quantizer")  # method name → pass class


@dataclass(frozen=True)
class WeightScheme:
    bits: int = 4
    group_size: int = 128        # 0 = one group per output channel
    symmetric: bool = False
    scale_dtype: str = "float16"
    method: str = "rtn"          # which quantizer produced the codes (informational)
    version: int = SCHEME_VERSION

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bit width {self.bits}; choose one of {SUPPORTED_BITS}")
        if self.group_size < 0 or (self.group_size and self.group_size % 8):
            raise ConfigError(f"group size {self.group_size} must be 0 (per channel) or a positive "
                              "multiple of 8")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale dtype '{self.scale_dtype}'; choose one of {SCALE_DTYPES}")

    def groups(self, in_features: int) -> int:
        g = self.group_size or in_features
        return -(-in_features // g)

    def effective_group(self, in_features: int) -> int:
        return self.group_size or in_features

    def packed_cols(self, in_features: int) -> int:
        return -(-in_features * self.bits // 8)

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Exact stored bytes of one weight matrix: packed codes + scales (+ zeros)."""
        sbytes = 4 if self.scale_dtype == "float32" else 2
        meta = self.groups(in_features) * out_features * sbytes * (1 if self.symmetric else 2)
        return out_features * self.packed_cols(in_features) + meta

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "WeightScheme":
        names = set(cls.__dataclass_fields__)
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"weight scheme: unknown field(s) {sorted(unknown)}")
        if d.get("version", SCHEME_VERSION) != SCHEME_VERSION:
            raise ConfigError(f"weight scheme version {d.get('version')} is not {SCHEME_VERSION}")
        return cls(**d)

    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.method}:int{self.bits}:{g}:{'sym' if self.symmetric else 'asym'}"
