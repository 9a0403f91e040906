"""palu: a low-rank latent KV cache (Palu, arXiv 2407.21118), group-wise (G-LRD) with calibrated
(whitened) factors, optionally stored with KIVI's quantizer.

For each group g of `heads_per_group` KV heads, the K projection rows of the group W_g
(group_dim × hidden) are replaced by a rank-r factorization W_g ≈ B_g A_gᵀ (Palu eq. 1-2,
"group-head low-rank decomposition", §3.2); the same for V. The cache stores the latent

    h = X A      (A = [A_k,1 .. A_k,n | A_v,1 .. A_v,n], hidden × (n·r_k + n·r_v))

of the attention input X, and

- reconstructs K when attending: K_g = h_k,g B_k,gᵀ + b_k, then k_norm and RoPE (RoPE comes after
  the reconstruction, so it cannot be folded, Palu §3.3 "reconstruction with RoPE");
- never reconstructs V: the attention weights are applied to the latent (P·h_v) and the result is
  projected once per query head by B_v of its group. This is Palu's fold of B_v into W_o (§3.3,
  eq. 6: o = Σ_h P_h h_v B_v,hᵀ W_o,h) evaluated per head; in the head-major layout of mcomp's
  attention node the product with B_v happens before o_proj, with the same FLOPs per token.

The factors are computed by the palu pass (mcomp/passes/palu.py) from calibration activations
(SVD-LLM whitening, Palu §3.4) and rank-allocated across layers by Fisher information (§3.5);
they are this kind's state tensors (`state_shapes`): `A`, `Bk` (n, group_dim, r_k), `Bv`
(n, group_dim, r_v), stored in the artifact with the weights. The biases of k_proj/v_proj are
read from the layer's projections.

Storage: `bits=0` keeps the latent in fp (`dtype`); 2/4/8 stores it with KIVI's quantizer as the
xquant cache does (shared store and C++ decode kernel, runtime/kv/xquant.py): the K latent per
channel over blocks of G tokens, the V latent per token in groups, an fp residual window and
fp sinks. Palu quantizes latents after an online Hadamard transform (§3.6); the pass folds that
rotation into A and B (`hadamard=True`), which leaves the fp result unchanged (H Hᵀ = I).

Shorthand: `palu:RATIO` (fraction of K/V channels removed, 0 < RATIO < 1, over the whole model),
`palu:RATIO:kivi2` / `:kivi4` / `:kivi8` (quantized latents) with `:gN` (group), `:rN` (fp residual
window), `:sN` (fp sinks), `:hgN` (KV heads per group; default all heads of the layer, Palu's J-LRD
for GQA models with few KV heads), `:nh` (no Hadamard), `:ts` / `:nots` (per-token RMS of the K
latent on / off; default on for layers with a K norm, as xquant), `:uniform` (the same rank in
every layer instead of the Fisher allocation), `:white` / `:pca` (the latent's channel scaling,
below).

Latent scaling. Any invertible D of the latent leaves B Aᵀ unchanged (h D, B D⁻ᵀ), so how the
latent's channels are scaled is free in fp and matters only to the quantizer. Palu's whitened
latent (unit variance per channel on the calibration tokens) was measured to break at 2 bits
(SmolLM2, palu:0.1:kivi2:s4: KL 0.61 against kivi2:s4's 0.05 on raw K/V): S⁻ᵀ boosts the rare
directions of the attention input to unit variance, so a token with energy there (a delimiter,
an attention-sink-like token) gets an outlier latent that widens its whole block's per-channel
range. Scaling channel i by its singular value (the principal components of the projection's
output, "pca") keeps every token's latent as large as its K/V, which is what KIVI already
quantizes well; it is the default for quantized latents.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...compiler.spec import LayerSpec
from ...errors import ConfigError
from ..kvcache import DTYPES, KVCache
from . import KVChoice, KVCost, KVKind, KVParams, exact_number, register_kind
from .xquant import XQuantCache, kv_weights, latent_bytes_held, latent_store_bytes

PALU_BITS = (0, 2, 4, 8)
ALLOCATIONS = ("fisher", "uniform")
#: how the pass scales the latent's channels (B Aᵀ is the same either way): "white" gives every
#: channel unit variance on the calibration tokens (Palu/SVD-LLM as written), "pca" gives channel
#: i the output energy σ_i² it carries (the principal components of the projection's output);
#: "auto" = pca for quantized latents, white for fp (where the two are the same function)
LATENTS = ("auto", "white", "pca")
#: ranks are allocated in steps of this many channels per group: keeps the quantized latent's
#: channel counts packable and its per-token groups whole
RANK_STEP = 8


@dataclass(frozen=True)
class PaluParams(KVParams):
    ratio: float = 0.5            # fraction of K/V channels removed over the model (the target)
    heads_per_group: int = 0      # KV heads per decomposition group; 0 = all of the layer's
    k_rank: int = 0               # this layer's rank per group (0 = full = group_dim); set by the pass
    v_rank: int = 0
    bits: int = 0                 # 0 = fp latent; 2/4/8 = KIVI-quantized latent
    group_size: int = 32
    residual: int = 128
    sink: int = 0
    hadamard: bool = True         # rotate the latents (folded into the factors) before quantizing
    allocation: str = "fisher"    # fisher | uniform
    latent: str = "auto"          # auto | white | pca: the pass's latent scaling (LATENTS)
    dtype: str = "float32"        # fp latent / fp window storage
    # divide each token's K latent by its RMS (fp16) before quantizing, as xquant does: "auto" =
    # on for layers with a K norm (gemma3, qwen3), which rescales every key to unit RMS
    token_scale: str = "auto"     # auto | on | off

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ConfigError(f"kv palu: ratio must be in (0, 1) (the fraction of K/V channels "
                              f"removed), got {self.ratio!r}")
        if self.bits not in PALU_BITS:
            raise ConfigError(f"kv palu: bits={self.bits} not supported; choose 0 (fp), 2, 4 or 8")
        for name, lo in (("heads_per_group", 0), ("k_rank", 0), ("v_rank", 0), ("group_size", 1),
                         ("residual", 0), ("sink", 0)):
            v = getattr(self, name)
            if type(v) is not int or v < lo:
                raise ConfigError(f"kv palu: {name} must be an integer >= {lo}, got {v!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"kv palu: allocation '{self.allocation}' not in {', '.join(ALLOCATIONS)}")
        if self.latent not in LATENTS:
            raise ConfigError(f"kv palu: latent '{self.latent}' not in {', '.join(LATENTS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"kv palu: dtype '{self.dtype}' not in {', '.join(DTYPES)}")
        if self.token_scale not in ("auto", "on", "off"):
            raise ConfigError(f"kv palu: token_scale '{self.token_scale}' not in auto, on, off")

    # -- geometry of one layer
    def groups(self, layer: LayerSpec) -> tuple[int, int]:
        """(number of groups, KV heads per group)."""
        hpg = self.heads_per_group or layer.n_kv_heads
        return layer.n_kv_heads // hpg, hpg

    def group_dim(self, layer: LayerSpec) -> int:
        return self.groups(layer)[1] * layer.head_dim

    def ranks(self, layer: LayerSpec) -> tuple[int, int]:
        """(K rank, V rank) per group."""
        gd = self.group_dim(layer)
        return self.k_rank or gd, self.v_rank or gd

    def latent_split(self, layer: LayerSpec) -> tuple[int, int]:
        """(K latent channels, V latent channels) of one token, all groups."""
        n = self.groups(layer)[0]
        rk, rv = self.ranks(layer)
        return n * rk, n * rv

    def token_scaled(self, layer: LayerSpec) -> bool:
        return bool(self.bits) and (self.token_scale == "on"
                                    or (self.token_scale == "auto" and layer.qk_norm))

    def v_group(self, layer: LayerSpec) -> int:
        """Channels per scale/min of the per-token V latent: the largest divisor of its width
        that is ≤ group_size."""
        rv = self.latent_split(layer)[1]
        return max(d for d in range(1, min(self.group_size, rv) + 1) if rv % d == 0)

    def label(self) -> str:
        q = f"-kivi{self.bits}-g{self.group_size}-r{self.residual}" if self.bits else ""
        return (f"palu-{self.ratio:g}" + (f"-hg{self.heads_per_group}" if self.heads_per_group else "")
                + (f"-k{self.k_rank}v{self.v_rank}" if self.k_rank or self.v_rank else "")
                + q + (f"-s{self.sink}" if self.sink else "")
                + ("" if self.hadamard or not self.bits else "-nh")
                + ("-uniform" if self.allocation == "uniform" else "")
                + ("" if self.latent == "auto" else f"-{self.latent}"))

    def latent_scaling(self) -> str:
        """"white" or "pca" (what "auto" means for this configuration)."""
        return self.latent if self.latent != "auto" else ("pca" if self.bits else "white")

    def check_layer(self, layer: LayerSpec) -> None:
        hpg = self.heads_per_group or layer.n_kv_heads
        if layer.n_kv_heads % hpg:
            raise ConfigError(f"kv palu: {hpg} KV heads per group do not divide the layer's "
                              f"{layer.n_kv_heads} KV heads")
        gd = self.group_dim(layer)
        for name in ("k_rank", "v_rank"):
            if getattr(self, name) > gd:
                raise ConfigError(f"kv palu: {name}={getattr(self, name)} exceeds the group's "
                                  f"head_dim·heads = {gd}")
        rk, rv = self.latent_split(layer)
        if self.bits and self.bits != 8 and (rk * self.group_size) % (8 // self.bits):
            raise ConfigError(f"kv palu: {rk}×{self.group_size} K-latent codes cannot be packed "
                              f"at {self.bits} bits")
        if self.bits and self.bits != 8 and (rv * self.group_size) % (8 // self.bits):
            raise ConfigError(f"kv palu: {rv}×{self.group_size} V-latent codes cannot be packed "
                              f"at {self.bits} bits")


class PaluCache(XQuantCache):
    """The latent store of xquant (sink | quantized blocks | residual) over Palu's latent; K is
    rematerialized through the block-diagonal B_k, V stays in the latent (module docstring)."""

    def __init__(self, layer: LayerSpec, batch: int, binding):
        KVCache.__init__(self, layer, batch, binding)
        p = layer.kv.params
        st = binding.state()
        if not st:
            raise ConfigError(f"palu: layer {binding.layer} has no palu factors (kv_state); "
                              "set the kind with the palu pass (--kv palu:RATIO)")
        _, _, self.bk, self.bv = kv_weights(binding, layer)
        self.A = st["A"].float()
        self.Bk = torch.block_diag(*st["Bk"].float().unbind(0))       # (kv_dim, n·r_k)
        self.Bv = torch.block_diag(*st["Bv"].float().unbind(0))       # (kv_dim, n·r_v)
        rk, rv = p.latent_split(layer)
        self._init_store(p, p.bits or 8, rk + rv, rk, rv, p.v_group(layer), p.token_scaled(layer),
                         split=True)
        if not p.bits:          # an fp latent: everything stays in the fp window
            self.R = 1 << 62


@register_kind
class Palu(KVKind):
    name = "palu"
    Params = PaluParams
    syntax = "palu:RATIO[:kivi2|:kivi4|:kivi8:gN:rN:sN:hgN:nh:ts|nots:uniform:white|pca]"
    needs_binding = True
    loads_kv = False
    reads_input = True

    def parse(self, arg, options, text):
        from ...compiler.spec import KVSpec
        try:
            ratio = float(options[0]) if not arg and options else None
        except ValueError:
            ratio = None
        if ratio is None:
            raise ConfigError(f"--kv '{text}': expected palu:RATIO (fraction of K/V channels "
                              "removed, in (0, 1)), options :kivi2/:kivi4/:kivi8 :gN :rN :sN :hgN "
                              ":nh :uniform")
        opts: dict = {"ratio": ratio}
        for o in options[1:]:
            if o.startswith("kivi") and o[4:].isdigit():
                opts["bits"] = int(o[4:])
            elif o.startswith("hg") and o[2:].isdigit():
                opts["heads_per_group"] = int(o[2:])
            elif o == "nh":
                opts["hadamard"] = False
            elif o in ("ts", "nots"):
                opts["token_scale"] = "on" if o == "ts" else "off"
            elif o == "uniform":
                opts["allocation"] = "uniform"
            elif o in ("white", "pca"):
                opts["latent"] = o
            elif o[:1] in ("g", "r", "s") and o[1:].isdigit():
                opts[{"g": "group_size", "r": "residual", "s": "sink"}[o[0]]] = int(o[1:])
            else:
                raise ConfigError(f"--kv '{text}': unknown option '{o}' (use kivi2, kivi4, kivi8, "
                                  "gN, rN, sN, hgN, nh, ts, nots, uniform, white, pca)")
        if "bits" not in opts and any(k in opts for k in ("group_size", "residual")):
            raise ConfigError(f"--kv '{text}': :gN and :rN configure the quantized latent; add "
                              ":kivi2, :kivi4 or :kivi8")
        return KVChoice(KVSpec("palu", PaluParams(**opts)), ":".join(["palu", *options]),
                        assign="palu")

    def cache(self, layer, batch, binding):
        return PaluCache(layer, batch, binding)

    def state_shapes(self, params, layer, hidden):
        n, _ = params.groups(layer)
        gd = params.group_dim(layer)
        rk, rv = params.ranks(layer)
        return {"A": ((hidden, n * (rk + rv)), "float32"), "Bk": ((n, gd, rk), "float32"),
                "Bv": ((n, gd, rv), "float32")}

    def bytes_per_token(self, params, layer):
        rk, rv = params.latent_split(layer)
        if not params.bits:
            return (rk + rv) * DTYPES[params.dtype].itemsize
        return exact_number(latent_store_bytes(params.bits, rk, rv, params.group_size,
                                               params.v_group(layer), params.token_scaled(layer)))

    def bytes_held(self, params, layer, n_tokens):
        return latent_bytes_held(params, *params.latent_split(layer), params.v_group(layer),
                                 params.token_scaled(layer), n_tokens)

    def cost(self, params, layer, context):
        Hq, D = layer.n_heads, layer.head_dim
        n, _ = params.groups(layer)
        gd = params.group_dim(layer)
        rk, rv = params.ranks(layer)
        factors = n * gd * (rk + rv) * 4
        read = self.bytes_held(params, layer, context) + factors
        flops = (2 * context * n * rk * gd    # K = h_k·B_kᵀ, group by group
                 + 2 * Hq * D * context       # q·Kᵀ
                 + 2 * Hq * context * rv      # P·h_v (each query head reads its group's latent)
                 + 2 * Hq * rv * D)           # (P·h_v)·B_vᵀ
        return KVCost(bytes_read=read, flops=flops)

    def verify_steps(self, params):
        return (params.residual + 2 * params.group_size) if params.bits else 4

    def lossless(self, params):
        return False
