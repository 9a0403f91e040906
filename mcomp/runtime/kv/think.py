"""think: query-driven key-channel pruning (ThinK, arXiv 2407.21018).

ThinK observes that the key cache is low-rank per channel: a few channels carry most of the
attention logit mass q·kᵀ, so it removes the key channels with the smallest query-weighted
magnitude and keeps the values in full. Here the channels are chosen once, offline, by the think
pass (mcomp/passes/think.py) from calibration activations, per layer and KV head; the kept
channel indices are this kind's state tensor `keep` (n_kv_heads, D_kept) int64, stored in the
artifact with the weights (`state_shapes`).

The cache stores, per token, the kept channels of the post-RoPE key, k[..., keep] (Hkv, D_kept),
and the full value (Hkv, D). Attention gathers the same channels of each query (query head h uses
the `keep` of its KV head, h // (Hq/Hkv)), so q_kept·k_keptᵀ is exactly q·kᵀ restricted to the
kept channels, and keeps the model's scale 1/√D: the removed channels are treated as zero, not
the head as narrower (ThinK §3: the pruned product approximates the full one).

RoPE: mcomp's half-split RoPE (compiler/model.py apply_rope) rotates channel j together with
j + D/2. A pair's contribution q_j k_j + q_{j+D/2} k_{j+D/2} depends on the position only through
the angle between the two 2-D vectors, its magnitude |q_pair|·|k_pair| does not, so channels are
kept or dropped a whole pair at a time (the pass scores pairs). A layer without RoPE prunes
channels independently; partial rotary (rope.dim < head_dim) is not supported.

Storage is eigen's ProjectedKVCache (runtime/kv/eigen.py) with U_k = U_q the one-hot columns of
`keep` and U_v = U_o = I: projecting onto one-hot columns is the gather above, so a token's row is
[k_h[keep_h] for every head | v_h for every head], and decode steps run the xquant C++ kernel in
its projected mode (scores over the kept channels straight from the store, no gather of the
context). Quantized (`:kivi2` / `:kivi4` / `:kivi8`, ThinK §4 "ThinK + KIVI"): the same rows with
KIVI's quantizer, keys per channel over blocks of G tokens, values per token in groups, an fp
residual window and sinks, quantized as KIVI quantizes raw K/V (a keep-all ThinK + KIVI equals a
KIVI cache, tested).

Shorthand: `think:RATIO` (fraction of each KV head's key channels removed, 0 < RATIO < 1, rounded
to the nearest channel; with RoPE the count must be even, whole pairs), `:fp16` / `:bf16` stores
the kept keys and the values at that width (default fp32), `:kivi2|:kivi4|:kivi8` with `:gN`
(group), `:rN` (fp residual window), `:sN` (fp sinks) quantizes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...compiler.spec import LayerSpec
from ...errors import ConfigError
from . import KVChoice, KVParams, register_kind
from .eigen import (ProjectedKind, ProjectedKVCache, check_store, check_store_options, store_label,
                    store_options)


@dataclass(frozen=True)
class ThinKParams(KVParams):
    VERSION = 2                   # 2: the quantized store (bits, group_size, residual, sink)

    ratio: float = 0.5            # fraction of each KV head's key channels removed
    dtype: str = "float32"        # storage of the kept keys and of the values (fp windows if bits)
    bits: int = 0                 # 0 = fp; 2/4/8 = KIVI-quantized kept keys and values
    group_size: int = 32
    residual: int = 128
    sink: int = 0

    def __post_init__(self):
        if (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                or not 0 < self.ratio < 1):
            raise ConfigError(f"kv think: ratio must be in (0, 1) (the fraction of key channels "
                              f"removed), got {self.ratio!r}")
        check_store(self, "think")

    def label(self) -> str:
        return f"think-{self.ratio:g}" + store_label(self)

    def removed(self, layer: LayerSpec) -> int:
        """Key channels removed per KV head in `layer`: RATIO·D rounded to the nearest channel
        (head dims are rarely multiples of 1/RATIO: think:0.4 removes 26 of 64 channels, 102 of
        256). Raises ConfigError when that leaves no channel removed or none kept, or, with
        RoPE, an odd count (it would split a rotated pair)."""
        D = layer.head_dim
        n = round(self.ratio * D)
        if not 1 <= n < D:
            raise ConfigError(f"kv think: ratio {self.ratio:g} removes {n} of the {D} key channels "
                              f"of head_dim {D}; choose a ratio that removes at least one and "
                              f"keeps at least one")
        if layer.rope is not None:
            if layer.rope.dim != D:
                raise ConfigError(f"kv think: partial rotary (rope dim {layer.rope.dim} < head_dim "
                                  f"{D}) is not supported")
            if n % 2:
                half = D // 2
                raise ConfigError(
                    f"kv think: ratio {self.ratio:g} removes {n} of {D} key channels, an odd "
                    f"count that leaves half of a RoPE pair (j, j+{half}); RoPE channels go in "
                    f"whole pairs: use ratio {(n - 1) / D:g} or {(n + 1) / D:g}")
        return n

    def kept(self, layer: LayerSpec) -> int:
        """D_kept: key channels each KV head keeps."""
        return layer.head_dim - self.removed(layer)

    def check_layer(self, layer: LayerSpec) -> None:
        self.removed(layer)


def kept_channels(layer: LayerSpec, binding) -> torch.Tensor:
    """The layer's kept key channels `keep` (Hkv, Dk) int64 from its KV state, validated."""
    st = binding.state() if binding is not None else {}
    if "keep" not in st:
        raise ConfigError(f"think: layer {getattr(binding, 'layer', '?')} has no kept-channel "
                          "indices (kv_state); set the kind with the think pass "
                          "(--kv think:RATIO)")
    keep = st["keep"].long()
    D, Hkv = layer.head_dim, layer.n_kv_heads
    # an all-zero (never filled) or corrupted state would silently attend over channel 0
    if (keep.dim() != 2 or keep.shape[0] != Hkv or not 1 <= keep.shape[1] <= D
            or int(keep.min()) < 0 or int(keep.max()) >= D
            or (keep.shape[1] > 1 and not bool((keep[:, 1:] > keep[:, :-1]).all()))):
        raise ConfigError(f"think: layer {binding.layer}: 'keep' must be ({Hkv}, ≤{D}) "
                          f"strictly increasing channel indices in [0, {D})")
    return keep


def think_cache(layer: LayerSpec, batch: int, binding) -> ProjectedKVCache:
    """ThinK's cache: eigen's ProjectedKVCache with U_k = U_q the one-hot columns of `keep` (a
    token stores k[..., keep], a query is gathered the same way) and U_v = U_o = I (all of V), fp
    or KIVI-quantized by the params. Decode steps run the xquant kernel's projected mode."""
    keep = kept_channels(layer, binding)
    D = layer.head_dim
    onehot = torch.eye(D)[:, keep].permute(1, 0, 2).contiguous()       # (Hkv, D, Dk)
    return ProjectedKVCache(layer, batch, binding, onehot,
                            torch.eye(D).expand(layer.n_kv_heads, D, D))


@register_kind
class ThinK(ProjectedKind):
    name = "think"
    Params = ThinKParams
    syntax = "think:RATIO[:fp16|:bf16][:kivi2|:kivi4|:kivi8:gN:rN:sN]"
    needs_binding = True          # the cache reads `keep` from the layer's KV state
    dense_bases = False           # q·Kᵀ over the kept channels (q gathered), P·V over all of V
    loads_kv = True               # load() gathers the kept channels of the given K

    def parse(self, arg, options, text):
        from ...compiler.spec import KVSpec
        try:
            ratio = float(options[0]) if not arg and options else None
        except ValueError:
            ratio = None
        if ratio is None:
            raise ConfigError(f"--kv '{text}': expected think:RATIO (fraction of key channels "
                              "removed, in (0, 1)), options :fp16 :bf16 :kivi2/:kivi4/:kivi8 :gN "
                              ":rN :sN")
        opts: dict = {"ratio": ratio}
        for o in options[1:]:
            if not store_options(o, opts):
                raise ConfigError(f"--kv '{text}': unknown option '{o}' (use fp16, bf16, kivi2, "
                                  "kivi4, kivi8, gN, rN, sN)")
        check_store_options(opts, text)
        return KVChoice(KVSpec("think", ThinKParams(**opts)), ":".join(["think", *options]),
                        assign="think")

    def cache(self, layer, batch, binding):
        return think_cache(layer, batch, binding)

    def state_shapes(self, params, layer, hidden):
        return {"keep": ((layer.n_kv_heads, params.kept(layer)), "int64")}

    def head_ranks(self, params, layer):
        return params.kept(layer), layer.head_dim
