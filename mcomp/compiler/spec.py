"""Model, layer, rope and KV specs: frozen dataclasses that describe a canonical model exactly.

A HF config cannot describe a model whose layers differ (after pruning, or with per-layer KV
representations); these specs can. They are the source of truth from which the canonical
module is built, and they serialize into the artifact manifest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError

SPEC_VERSION = 2   # 2: KVSpec = {kind, params} (1: a flat KIVI record; codegen migrates)


def _from_mapping(cls, data: Mapping[str, Any], *, where: str):
    """Build a flat frozen dataclass from a mapping, rejecting unknown keys with the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**dict(data))


def _kv_kinds():
    # the registry lives with the caches (runtime/kv); imported lazily because the kinds'
    # params check layers, i.e. import this module
    from ..runtime.kv import KV_KINDS
    return KV_KINDS


@dataclass(frozen=True)
class KVSpec:
    """How a layer's K/V are stored: a registered KV representation (`kind`, runtime/kv/) and
    that kind's frozen, versioned `params`. The default is a dense fp32 cache.

    This class knows no kind: validation, labels, per-layer checks and serialization of the
    params belong to the kind's params class (runtime/kv/<kind>.py)."""

    kind: str = "dense"
    params: Any = None          # the kind's KVParams; None → the kind's defaults

    def __post_init__(self):
        kind = _kv_kinds().get(self.kind)          # ConfigError listing the registered kinds
        if self.params is None:
            object.__setattr__(self, "params", kind.Params())
        elif not isinstance(self.params, kind.Params):
            raise ConfigError(f"kv spec: kind '{self.kind}' takes {kind.Params.__name__}, got "
                              f"{type(self.params).__name__}")

    def label(self) -> str:
        return self.params.label()

    def check_layer(self, layer: "LayerSpec") -> None:
        """Constraints that need the layer (LayerSpec calls this)."""
        self.params.check_layer(layer)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KVSpec":
        unknown = set(d) - {"kind", "params"}
        if unknown:
            raise ConfigError(f"kv spec: unknown field(s) {sorted(unknown)}; valid: kind, params "
                              "(a format-2 manifest's flat KV record loads through its migration)")
        kind = _kv_kinds().get(d.get("kind", "dense"))
        params = kind.Params.from_dict(d.get("params") or {}, where=f"kv spec '{kind.name}'")
        return cls(kind=kind.name, params=params)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters. `scaling` is one of: none, linear, llama3."""

    theta: float = 10000.0
    dim: int = 64  # rotated channels per head (== head_dim for every supported family)
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RopeSpec":
        return _from_mapping(cls, d, where="rope spec")


@dataclass(frozen=True)
class LayerSpec:
    """One decoder block. Every field may differ between layers."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    window: int | None = None          # sliding-window size in tokens; None = global attention
    rope: RopeSpec | None = None       # None for learned absolute positions (gpt2)
    qk_norm: bool = False              # per-head RMSNorm on q and k before RoPE (qwen3, gemma3)
    qkv_bias: bool = False
    o_bias: bool = False               # also the slot for FLAP bias compensation
    mlp_bias: bool = False             # bias on gate/up (plain MLP: on up)
    down_bias: bool = False
    sandwich_norm: bool = False        # gemma: norms after attention and after MLP too
    fused_qkv: bool = False            # set by the fuse_qkv pass
    fused_gate_up: bool = False        # set by the fuse_gate_up pass
    kv: KVSpec = field(default_factory=KVSpec)

    def __post_init__(self):
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"layer spec: n_heads={self.n_heads} must be a positive multiple of "
                f"n_kv_heads={self.n_kv_heads}")
        self.kv.check_layer(self)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope"] = None if self.rope is None else self.rope.to_dict()
        d["kv"] = self.kv.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerSpec":
        d = dict(d)
        rope = d.pop("rope", None)
        kv = d.pop("kv", None)
        d["rope"] = None if rope is None else RopeSpec.from_dict(rope)
        d["kv"] = KVSpec() if kv is None else KVSpec.from_dict(kv)
        return _from_mapping(cls, d, where="layer spec")


@dataclass(frozen=True)
class ModelSpec:
    """The whole canonical model."""

    family: str                         # frontend that imported it: llama, qwen2, qwen3, gemma3, gpt2
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    norm: str = "rms"                   # rms | layer
    norm_eps: float = 1e-5
    act: str = "silu"                   # key into compiler.model.ACTIVATIONS
    gated_mlp: bool = True
    learned_positions: int = 0          # >0: size of a learned absolute position table (gpt2)
    embed_scale: float = 1.0            # gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float | None = None     # None → head_dim ** -0.5
    final_logit_softcap: float | None = None
    tie_embeddings: bool = True
    max_positions: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    version: int = SPEC_VERSION

    def __post_init__(self):
        if not self.layers:
            raise ConfigError("model spec has no layers")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def with_layer(self, i: int, **changes) -> "ModelSpec":
        layers = list(self.layers)
        layers[i] = dataclasses.replace(layers[i], **changes)
        return dataclasses.replace(self, layers=tuple(layers))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [l.to_dict() for l in self.layers]
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        d = dict(d)
        if d.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise ConfigError(f"model spec version {d.get('version')} is not {SPEC_VERSION}")
        d["layers"] = tuple(LayerSpec.from_dict(l) for l in d.get("layers", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return _from_mapping(cls, d, where="model spec")
