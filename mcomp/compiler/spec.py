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
from .hadamard import hadamard_block

SPEC_VERSION = 1


def _from_mapping(cls, data: Mapping[str, Any], *, where: str):
    """Build a flat frozen dataclass from a mapping, rejecting unknown keys with the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**dict(data))


KV_KINDS = ("dense", "kivi")
KV_BITS = (2, 4, 8)
KV_DTYPES = ("float32", "bfloat16", "float16")
KV_ROTATIONS = ("none", "hadamard")


@dataclass(frozen=True)
class KVSpec:
    """How a layer's K/V are stored (the runtime container is KV_REPRESENTATIONS[kind]).

    - `dense`: full precision K/V in `dtype`.
    - `kivi`: KIVI-style asymmetric quantization. Keys per channel (scale/min per (head, channel)
      over a block of `group_size` tokens) or, for ablations, per token (`k_axis="token"`);
      values per token over groups of `min(group_size, head_dim)` channels. The `residual` most
      recent tokens stay in full precision (`dtype`) and are flushed into the quantized store
      `group_size` tokens at a time; the first `sink` tokens are never quantized.
      `k_rotation="hadamard"` rotates keys and queries online, after RoPE, by an orthonormal
      Hadamard matrix R (head_dim × head_dim) before keys are stored: q·kᵀ = (qR)(kR)ᵀ, so
      attention is unchanged in full precision while outlier channels are spread over the
      head before quantization (QuaRot). RoPE sits between k_proj and the cache, so this
      rotation cannot be folded into weights; V rotation can (the rotate_v pass).

    Every field has a default so manifests written before the quantized kinds existed load
    unchanged (their `kv` dict only has kind and dtype)."""

    kind: str = "dense"
    dtype: str = "float32"          # dense storage; for kivi: the fp residual/sink storage
    k_bits: int = 4
    v_bits: int = 4
    group_size: int = 32
    residual: int = 128
    sink: int = 0
    k_axis: str = "channel"         # channel (KIVI) | token (ablation)
    k_rotation: str = "none"        # none | hadamard (online, post-RoPE, on keys and queries)

    def __post_init__(self):
        if self.kind not in KV_KINDS:
            raise ConfigError(f"kv spec: unknown kind '{self.kind}'; valid: {', '.join(KV_KINDS)}")
        if self.dtype not in KV_DTYPES:
            raise ConfigError(f"kv spec: dtype '{self.dtype}' not in {', '.join(KV_DTYPES)}")
        if self.k_rotation not in KV_ROTATIONS:
            raise ConfigError(f"kv spec: k_rotation '{self.k_rotation}' not in "
                              f"{', '.join(KV_ROTATIONS)}")
        if self.kind != "kivi":
            if self.k_rotation != "none":  # a dense cache is exact: nothing to rotate for
                raise ConfigError(f"kv spec: k_rotation needs a quantized kind, not '{self.kind}'")
            return
        for name in ("k_bits", "v_bits"):
            if getattr(self, name) not in KV_BITS:
                raise ConfigError(f"kv spec: {name}={getattr(self, name)} must be one of "
                                  f"{', '.join(map(str, KV_BITS))}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"kv spec: group_size must be a positive integer, got {self.group_size}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ConfigError(f"kv spec: residual must be an integer >= 0, got {self.residual}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ConfigError(f"kv spec: sink must be an integer >= 0, got {self.sink}")
        if self.k_axis not in ("channel", "token"):
            raise ConfigError(f"kv spec: k_axis '{self.k_axis}' must be 'channel' or 'token'")

    def label(self) -> str:
        if self.kind == "dense":
            return f"dense-{self.dtype}"
        k = f"k{self.k_bits}" + ("t" if self.k_axis == "token" else "")
        return (f"kivi-{k}v{self.v_bits}-g{self.group_size}-r{self.residual}"
                + (f"-s{self.sink}" if self.sink else "")
                + ("-hk" if self.k_rotation == "hadamard" else ""))

    def check_layer(self, head_dim: int) -> None:
        """Constraints that need the layer's head_dim (LayerSpec calls this)."""
        if self.kind != "kivi":
            return
        gv = min(self.group_size, head_dim)
        if head_dim % gv:
            raise ConfigError(f"kv spec: value channel group min(group_size={self.group_size}, "
                              f"head_dim={head_dim}) must divide head_dim")
        if self.k_rotation == "hadamard":
            hadamard_block(head_dim)  # ConfigError when head_dim has no usable Hadamard block
        for bits in (self.k_bits, self.v_bits):
            if head_dim % (8 // bits):
                raise ConfigError(f"kv spec: head_dim={head_dim} must be a multiple of "
                                  f"{8 // bits} to pack {bits}-bit codes")

    def to_dict(self) -> dict:
        """Only the fields the kind uses: a dense spec serializes exactly as before the
        quantized kinds existed (kind, dtype), so dense manifests are unchanged."""
        d = dataclasses.asdict(self)
        if self.kind == "dense":
            return {"kind": self.kind, "dtype": self.dtype}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KVSpec":
        return _from_mapping(cls, d, where="kv spec")


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
        self.kv.check_layer(self.head_dim)

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
