"""xquant-cl: cross-layer XQuant (XQuant-CL, arXiv 2508.10395), combined with the GQA latent.

The observation XQuant-CL builds on: the residual stream changes little from one layer to the
next, so a layer's attention input X_i is well predicted by the previous layer's, and only the
small difference needs to be stored, at very low bits. How mcomp combines that with the GQA
latent of plain `xquant` (GQA models, where X itself is larger than K+V):

- Work in the norm's unit direction u = (h − c) / g, where h = g ⊙ x/rms(x) + c is the attention
  input and g, c the layer's norm gain and bias: u is x/rms(x), the part of X the residual stream
  carries from layer to layer (g differs per layer and would make the raw differences large).
  K/V are linear in u: [K; V]_pre = u · (W diag g)ᵀ + (b + W c), exactly.
- Each layer has its own orthonormal latent basis U_i (hidden × r): the right singular vectors of
  [W_k; W_v]·diag(g_i), so K/V of layer i depend only on L_i = u_i U_i (exact at full rank
  r = 2·kv_dim, as in `xquant:...:stacked`).
- A cross-layer accumulator û (B × S × hidden, per held quantized token) carries the running
  reconstruction of u down the layers. Layer i predicts its latent from it, L̃_i = û U_i, stores
  only the quantized difference ê_i = Q(L_i − L̃_i), and reconstructs L̂_i = L̃_i + ê_i. It then
  updates the accumulator in its own span, û ← û + ê_i U_iᵀ (so û U_i = L̂_i: the prediction is
  the previous reconstruction, not the previous exact value, so quantization errors do not
  accumulate down the layers; directions outside span(U_i) keep what earlier layers put there).
- Anchors: the first layer of a run of xquant-cl layers (and every `anchor_every`-th after it)
  has nothing to predict from; it stores its latent itself at `anchor_bits` and restarts the
  accumulator. Which layers anchor is set per layer when the kind is assigned (`for_layer`).

Why this and not deltas of the latents themselves: each layer's latent lives in its own basis,
so L_i − L_{i−1} means nothing; and deltas of the full hidden state would store `hidden` values
per layer (SmolLM2: 576 > K+V's 384), losing GQA's saving. Predicting through the accumulator
stores r ≤ 2·kv_dim values per layer and still exploits the cross-layer similarity.

The cost is compute and a transient buffer: every decode step rebuilds the accumulator from the
first layer over the whole quantized context (two S × hidden × r products per layer on top of
xquant's K rematerialization), and holds one (B, S, hidden) fp32 accumulator while a forward runs
(freed after the run's last layer). It pays where capacity is the limit (more context or more
sequences in the memory), not in tokens per second on a CPU.

Storage per layer: the r latent (or delta) channels quantized per channel over blocks of G
tokens (asymmetric, fp16 scale/min per block and channel), an fp residual window of the
`residual` newest tokens and `sink` fp tokens, the same schedule as KIVI/xquant. Every layer of a
run must share it (the accumulator is per quantized token).

Shorthand: `xquant-cl:BITS` (delta bits 1, 2, 4, 8) with `:aBITS` (anchor bits, default 4),
`:pN` (an anchor every N layers; default 0 = only the first), `:rRANK`, `:gN` (group, default 64),
`:resN` (fp residual), `:sN` (sinks). Pure-torch reference path (no fast kernel).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction

import torch

from ...compiler.spec import LayerSpec
from ...errors import ConfigError
from ..kvcache import DTYPES, KVCache
from . import KVChoice, KVCost, KVKind, KVParams, exact_number, register_kind, window_split
from .kivi import SCALE_DTYPE, quantize_minmax
from .xquant import XQuantCache, kv_weights, right_basis

DELTA_BITS = (1, 2, 4, 8)
ANCHOR_BITS = (2, 4, 8)
_CHAIN = "xquant-cl"      # key of the accumulator in KVBinding.shared


@dataclass(frozen=True)
class XQuantCLParams(KVParams):
    bits: int = 2               # bits of the stored cross-layer differences
    anchor_bits: int = 4        # bits of an anchor layer's latent
    anchor_every: int = 0       # an anchor every N layers of a run; 0 = only the first
    anchor: bool = False        # this layer anchors (set by XQuantCL.for_layer)
    rank: int = 0               # 0 = full rank (2·kv_dim)
    group_size: int = 64
    residual: int = 128
    sink: int = 0
    dtype: str = "float32"      # fp residual / sink storage
    hidden: int = 0             # the model's hidden size, for the cost model (set by for_layer)

    def __post_init__(self):
        if self.bits not in DELTA_BITS:
            raise ConfigError(f"kv xquant-cl: bits={self.bits} not supported; choose one of "
                              f"{', '.join(map(str, DELTA_BITS))}")
        if self.anchor_bits not in ANCHOR_BITS:
            raise ConfigError(f"kv xquant-cl: anchor bits={self.anchor_bits} not supported; "
                              f"choose one of {', '.join(map(str, ANCHOR_BITS))}")
        for name, lo in (("anchor_every", 0), ("hidden", 0), ("rank", 0), ("group_size", 1), ("residual", 0),
                         ("sink", 0)):
            v = getattr(self, name)
            if type(v) is not int or v < lo:
                raise ConfigError(f"kv xquant-cl: {name} must be an integer >= {lo}, got {v!r}")
        if type(self.anchor) is not bool:
            raise ConfigError(f"kv xquant-cl: anchor must be true or false, got {self.anchor!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"kv xquant-cl: dtype '{self.dtype}' not in {', '.join(DTYPES)}")

    def rank_for(self, layer: LayerSpec) -> int:
        return self.rank or 2 * layer.kv_dim

    @property
    def layer_bits(self) -> int:
        return self.anchor_bits if self.anchor else self.bits

    def label(self) -> str:
        return ("xquant-cl" + (f"-anchor-x{self.anchor_bits}" if self.anchor else
                               f"-d{self.bits}-a{self.anchor_bits}")
                + (f"-p{self.anchor_every}" if self.anchor_every else "")
                + (f"-r{self.rank}" if self.rank else "")
                + f"-g{self.group_size}-res{self.residual}" + (f"-s{self.sink}" if self.sink else ""))

    def check_layer(self, layer: LayerSpec) -> None:
        r = self.rank_for(layer)
        if r > 2 * layer.kv_dim:
            raise ConfigError(f"kv xquant-cl: rank {r} exceeds the layer's stacked K/V rank "
                              f"2·kv_dim = {2 * layer.kv_dim}")
        for b in (self.bits, self.anchor_bits):
            if b != 8 and (r * self.group_size) % (8 // b):
                raise ConfigError(f"kv xquant-cl: {r}×{self.group_size} codes cannot be packed "
                                  f"at {b} bits")


def cl_factors(binding, layer: LayerSpec, r: int):
    """(U (hidden, r) orthonormal basis in u-space, A_in (hidden, r) and off (r,) with
    L = h·A_in − off = u·U, B_k, B_v (kv_dim, r), b_k, b_v) for the layer's current weights."""
    wk, wv, bk, bv = kv_weights(binding, layer)
    norm = binding.module("attn_norm")
    g = norm.weight.detach().float()
    c = (norm.bias.detach().float() if getattr(norm, "bias", None) is not None
         else torch.zeros_like(g))
    # a gain of 0 would make u undefined; any nonzero gain keeps h = g ⊙ u + c exact, so clamp
    # tiny gains (their channels barely reach K/V) away from 0, keeping the sign
    floor = 1e-3 * g.abs().max().clamp(min=1e-12)
    g = torch.where(g >= 0, g.clamp(min=floor), g.clamp(max=-floor))
    U = right_basis(torch.cat([wk, wv], 0) * g, r)                        # (hidden, r) f64
    gd, cd = g.double(), c.double()
    Bk, Bv = (wk.double() * gd) @ U, (wv.double() * gd) @ U
    bk2, bv2 = bk.double() + wk.double() @ cd, bv.double() + wv.double() @ cd
    A_in, off = U / gd[:, None], (cd / gd) @ U
    f = lambda t: t.float().contiguous()  # noqa: E731
    return f(U), f(A_in), f(off), f(Bk), f(Bv), f(bk2), f(bv2)


def quantize_delta(x: torch.Tensor, dim: int, bits: int):
    """The quantizer of the stored differences, in the store's (code, scale, min) form.

    2+ bits: KIVI's asymmetric min/max grid. 1 bit: min/max would be useless (two levels at the
    extremes of a block leave a typical value's error larger than the value: the accumulator
    then amplifies errors layer after layer and diverges); the L2-optimal binary code instead is
    x ≈ μ ± σ₁ with μ the mean and σ₁ = mean|x − μ| (error ≈ 0.6·std), i.e. scale 2σ₁, min μ − σ₁."""
    if bits != 1:
        return quantize_minmax(x, dim, bits)
    x = x.float()
    mu = x.mean(dim, keepdim=True)
    s1 = (x - mu).abs().mean(dim, keepdim=True)
    s16 = (2 * s1).clamp(min=1e-5).to(SCALE_DTYPE)
    m16 = (mu - s1).to(SCALE_DTYPE)
    q = (x >= mu).to(torch.uint8)
    return q, s16, m16


class _Chain:
    """The cross-layer accumulator of one AttentionState: û (B, n_q, hidden) fp32 after
    layer `layer` of the current forward."""

    def __init__(self):
        self.u: torch.Tensor | None = None
        self.layer = -1


class XQuantCLCache(XQuantCache):
    """One layer's store of quantized latent differences (or, on an anchor, of its latent)."""

    def __init__(self, layer: LayerSpec, batch: int, binding):
        KVCache.__init__(self, layer, batch, binding)
        p = layer.kv.params
        r = p.rank_for(layer)
        (self.U, self.A, self.off, self.Bk, self.Bv,
         self.bk, self.bv) = cl_factors(binding, layer, r)
        # no per-token scale (xquant's token_scale): on Gemma 3 dividing each token's
        # difference by its RMS made KL worse (0.62 → 0.77), so it is not used here
        self._init_store(p, p.layer_bits, r, r, 0, 1, False, split=False)
        self.anchor = p.anchor
        spec_layers = _spec_layers(binding)
        i = binding.layer
        # the last layer of the run frees the accumulator (it is rebuilt every forward)
        self.ends_run = i + 1 >= len(spec_layers) or spec_layers[i + 1].kv.kind != XQuantCL.name
        self._base = None
        self._lat_q = None

    quantize = staticmethod(quantize_delta)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return h.float() @ self.A - self.off

    def fast_decode(self, q, scale, mask):
        return None   # reference only: the accumulator makes the latent dense anyway

    def _chain(self) -> _Chain:
        return self.binding.shared.setdefault(_CHAIN, _Chain())

    def append_latent(self, lat: torch.Tensor, positions: torch.Tensor) -> None:
        chain, i = self._chain(), self.binding.layer
        if self.anchor:
            self._base = None
        elif chain.layer != i - 1:
            raise ConfigError(f"xquant-cl: layer {i} predicts from layer {i - 1}'s accumulator, "
                              f"but layer {i - 1} is not an xquant-cl layer of the same run; "
                              "assign xquant-cl to a contiguous run of layers")
        else:
            self._base = chain.u
        super().append_latent(lat, positions)            # flushes through _flush_block
        nq, base = self.n_q, self._base
        if base is not None and base.shape[1] < nq:
            raise ConfigError(f"xquant-cl: layer {i} quantized {nq} tokens but the accumulator "
                              f"holds {base.shape[1]}: every layer of a run needs the same "
                              "group, residual and sink")
        deq = self.store_latent()                                        # (B, nq, r) ê or L̂
        if base is None:
            u, self._lat_q = deq @ self.U.T, deq
        else:
            b = base[:, :nq]
            self._lat_q = b @ self.U + deq
            u = b + deq @ self.U.T
        chain.u, chain.layer = u, i
        self._base = None
        if self.ends_run:
            chain.u, chain.layer = None, -1

    def _flush_block(self, blk: torch.Tensor) -> None:
        if self._base is not None:     # store the difference from the accumulator's prediction
            j = self.n_q
            blk = blk - self._base[:, j:j + self.G] @ self.U
        super()._flush_block(blk)

    def latent(self) -> torch.Tensor:
        parts = [t.float() for t in (self.sink, self._lat_q, self.res) if t is not None]
        return torch.cat(parts, 1) if parts else torch.empty(self.batch, 0, self.r)

    def attend(self, q, k, v, scale, mask, h=None, positions=None):
        try:
            return super().attend(q, k, v, scale, mask, h=h, positions=positions)
        finally:
            self._lat_q = None     # the reconstruction is per step, not held between steps


def _spec_layers(binding):
    """The layers of the spec the AttentionState built its caches from (not the model's own,
    which a caller may have left without this KV assignment)."""
    spec = binding.shared.get("spec")
    if spec is None:
        from ...compiler import ir
        spec = ir.get_spec(binding.model)
    return spec.layers


@register_kind
class XQuantCL(KVKind):
    name = "xquant-cl"
    Params = XQuantCLParams
    syntax = "xquant-cl:BITS[:aBITS:pN:rRANK:gN:resN:sN]"
    needs_binding = True
    loads_kv = False
    reads_input = True

    def parse(self, arg, options, text):
        from ...compiler.spec import KVSpec
        if arg or not options or not options[0].isdigit():
            raise ConfigError(f"--kv '{text}': expected xquant-cl:BITS (1, 2, 4 or 8), options "
                              ":aBITS :pN :rRANK :gGROUP :resRESIDUAL :sSINK")
        opts: dict = {"bits": int(options[0])}
        keys = {"a": "anchor_bits", "p": "anchor_every", "r": "rank", "g": "group_size",
                "s": "sink"}
        for o in options[1:]:
            if o.startswith("res") and o[3:].isdigit():
                opts["residual"] = int(o[3:])
            elif o[:1] in keys and o[1:].isdigit():
                opts[keys[o[0]]] = int(o[1:])
            else:
                raise ConfigError(f"--kv '{text}': unknown option '{o}' (use aBITS, pN, rRANK, "
                                  "gN, resN, sN)")
        return KVChoice(KVSpec(self.name, XQuantCLParams(**opts)), ":".join([self.name, *options]))

    def for_layer(self, spec, model, layer, chosen):
        from ...compiler.spec import KVSpec
        start = layer
        while start - 1 in chosen:
            start -= 1
        every = spec.params.anchor_every
        anchor = start == layer or bool(every and (layer - start) % every == 0)
        return KVSpec(spec.kind, dataclasses.replace(spec.params, anchor=anchor,
                                                          hidden=model.hidden_size))

    def cache(self, layer, batch, binding):
        return XQuantCLCache(layer, batch, binding)

    @staticmethod
    def _store_per_token(p: XQuantCLParams, layer: LayerSpec) -> Fraction:
        r = p.rank_for(layer)
        return Fraction(r * p.layer_bits, 8) + Fraction(2 * SCALE_DTYPE.itemsize * r, p.group_size)

    def bytes_per_token(self, params, layer):
        return exact_number(self._store_per_token(params, layer))

    def bytes_held(self, params, layer, n_tokens):
        ns, nq, nr = window_split(n_tokens, params.sink, params.residual, params.group_size)
        fp = params.rank_for(layer) * DTYPES[params.dtype].itemsize
        return int((ns + nr) * fp + nq * self._store_per_token(params, layer))

    def cost(self, params, layer, context):
        r, kv, Hq, D = params.rank_for(layer), layer.kv_dim, layer.n_heads, layer.head_dim
        hidden = params.hidden or max(layer.q_dim, 2 * kv)   # 0: a spec not built by assign_kv
        factors = (2 * kv * r + hidden * r) * 4                          # B_k, B_v, U fp32
        accumulator = 2 * context * hidden * 4                           # û read + written
        read = self.bytes_held(params, layer, context) + factors + accumulator
        flops = (2 * 2 * context * hidden * r  # prediction û·U and update ê·Uᵀ
                 + 2 * context * r * kv        # K = L·B_kᵀ over the context
                 + 2 * Hq * D * context        # q·Kᵀ
                 + 2 * Hq * context * r        # P·L
                 + 2 * Hq * r * D)             # (P·L)·B_vᵀ
        return KVCost(bytes_read=read, flops=flops)

    def verify_steps(self, params):
        return params.residual + 2 * params.group_size
