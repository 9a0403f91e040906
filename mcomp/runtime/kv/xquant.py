"""xquant: KV rematerialization (XQuant, arXiv 2508.10395), GQA variant: cache a quantized latent
of the layer input X instead of K and V, and recompute K and V from it when attending.

X is the attention input (the normed hidden state the layer hands its cache at the boundary).
For GQA models plain X is larger than K+V (SmolLM2: hidden 576 vs K+V 384 per token), so, as
the paper's GQA variant does, the cache stores the projection of X onto the right singular basis
of the stacked K/V weights W = [W_k; W_v] (2·kv_dim × hidden):

    W = U Σ Aᵀ (A: hidden × 2·kv_dim, orthonormal columns),   L = X A_r   (r ≤ 2·kv_dim)
    K_pre = L B_kᵀ + b_k,  V = L B_vᵀ + b_v   with B_k = W_k A_r, B_v = W_v A_r

At full rank r = rank(W) this is exact (the rows of W lie in the span of A); `:rRANK` keeps the
r directions with the largest singular values. The factors are a function of the layer's current
K/V projection weights, derived when the cache is built (through the KVBinding), so no weights
are added to the artifact and a pass that rewrites W_k/W_v (AWQ's fold into the norm, rotate_v,
quantization: the dequantized weights are used) is seen.

Attending (per decode step, over S held tokens):
- K is rematerialized: K = rope(k_norm(L B_kᵀ + b_k)) at the held positions, then q·Kᵀ;
- V never is: the attention weights P are applied to the latent (P·L, Hq × r per query) and
  then projected once per query head by B_v of its KV group; P's rows sum to 1, so b_v is added
  after. This is the "fold the V-side factor into the attention output" of the issue.

Storage (KIVI's quantizer on the latent, one "head" of r channels): per-channel asymmetric
codes over blocks of G tokens (channels of an SVD basis differ in scale by orders of
magnitude, so per-channel is the natural axis), fp16 scale/min per (block, channel), an fp
residual window of the `residual` most recent tokens flushed G at a time, `sink` fp tokens.

Shorthand: `xquant:BITS` (2, 4, 8) with `:rRANK` (latent rank, default full = 2·kv_dim),
`:gN` (group), `:resN` (fp residual window; `r` is the rank here), `:sN` (sinks).

This is the pure-torch reference path (dequantize the latent, rematerialize K over the held
tokens); a C++ decode kernel that reads the packed latent directly is not built yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from ...compiler.spec import LayerSpec
from ...errors import ConfigError
from ..kvcache import DTYPES, KVCache
from . import KVChoice, KVCost, KVKind, KVParams, register_kind
from .kivi import SCALE_DTYPE, pack_planar, quantize_minmax, unpack_planar

XQ_BITS = (2, 4, 8)


@dataclass(frozen=True)
class XQuantParams(KVParams):
    bits: int = 4
    rank: int = 0                  # 0 = full rank (2·kv_dim)
    group_size: int = 32
    residual: int = 128
    sink: int = 0
    dtype: str = "float32"         # fp residual / sink storage

    def __post_init__(self):
        if self.bits not in XQ_BITS:
            raise ConfigError(f"kv xquant: bits={self.bits} not supported; choose one of "
                              f"{', '.join(map(str, XQ_BITS))}")
        for name, lo in (("rank", 0), ("group_size", 1), ("residual", 0), ("sink", 0)):
            v = getattr(self, name)
            if type(v) is not int or v < lo:
                raise ConfigError(f"kv xquant: {name} must be an integer >= {lo}, got {v!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"kv xquant: dtype '{self.dtype}' not in {', '.join(DTYPES)}")

    def rank_for(self, layer: LayerSpec) -> int:
        return self.rank or 2 * layer.kv_dim

    def label(self) -> str:
        return (f"xquant-x{self.bits}" + (f"-r{self.rank}" if self.rank else "")
                + f"-g{self.group_size}-res{self.residual}" + (f"-s{self.sink}" if self.sink else ""))

    def check_layer(self, layer: LayerSpec) -> None:
        r = self.rank_for(layer)
        if r > 2 * layer.kv_dim:
            raise ConfigError(f"kv xquant: rank {r} exceeds the layer's stacked K/V rank "
                              f"2·kv_dim = {2 * layer.kv_dim}")
        if r % (8 // self.bits) and self.bits != 8:
            raise ConfigError(f"kv xquant: rank {r} must be a multiple of {8 // self.bits} to "
                              f"pack {self.bits}-bit codes")


def latent_factors(binding, layer: LayerSpec, rank: int):
    """(A (hidden, r), B_k (kv_dim, r), B_v (kv_dim, r), b_k, b_v) from the layer's current K/V
    projection weights (dequantized if quantized; sliced from a fused qkv_proj)."""
    def weight_of(mod):
        w = mod.dequantize() if hasattr(mod, "dequantize") else mod.weight
        return w.detach().float(), (None if getattr(mod, "bias", None) is None
                                    else mod.bias.detach().float())

    q, kv = layer.q_dim, layer.kv_dim
    if binding.has("k_proj"):
        (wk, bk), (wv, bv) = weight_of(binding.module("k_proj")), weight_of(binding.module("v_proj"))
    elif binding.has("qkv_proj"):
        w, b = weight_of(binding.module("qkv_proj"))
        wk, wv = w[q:q + kv], w[q + kv:q + 2 * kv]
        bk, bv = (None, None) if b is None else (b[q:q + kv], b[q + kv:q + 2 * kv])
    else:
        raise ConfigError(f"xquant: layer {binding.layer} has no k_proj/v_proj (or qkv_proj) whose "
                          "input is the attention input")
    W = torch.cat([wk, wv], 0).double()                                  # (2·kv, hidden)
    _, _, Vh = torch.linalg.svd(W, full_matrices=False)                  # Vh: (2·kv, hidden)
    A = Vh[:rank].T.contiguous()                                         # (hidden, r)
    Bk, Bv = (wk.double() @ A).float(), (wv.double() @ A).float()        # (kv, r)
    zeros = torch.zeros(kv)
    return A.float(), Bk, Bv, (zeros if bk is None else bk), (zeros if bv is None else bv)


class XQuantCache(KVCache):
    """Latent store for one layer: [sink (fp) | quantized blocks | residual (fp)] in append order."""

    def __init__(self, layer: LayerSpec, batch: int, binding):
        super().__init__(layer, batch, binding)
        p = layer.kv.params
        self.p = p
        self.r = p.rank_for(layer)
        self.G, self.R, self.n_sink = p.group_size, p.residual, p.sink
        self.H, self.D = layer.n_kv_heads, layer.head_dim
        self.fp_dtype = DTYPES[p.dtype]
        self.A, self.Bk, self.Bv, self.bk, self.bv = latent_factors(binding, layer, self.r)
        self.has_knorm = binding.has("k_norm")
        self.sink = self.res = None                 # (B, n, r) fp
        self.codes: list[torch.Tensor] = []         # per block (B, G·r·bits/8) uint8, channel-major
        self.scales: list[torch.Tensor] = []        # per block (B, 2, r) fp16 scale, min
        self.pos = torch.empty(batch, 0, dtype=torch.long)   # positions of held tokens, in order

    # ------------------------------------------------------------------ store

    @property
    def n_q(self) -> int:
        return len(self.codes) * self.G

    def _held(self, t):
        return 0 if t is None else t.shape[1]

    def append_latent(self, lat: torch.Tensor, positions: torch.Tensor) -> None:
        """lat (B, T, r), positions (B, T)."""
        T = lat.shape[1]
        self.length += T
        self.pos = torch.cat([self.pos, positions], 1)
        lat = lat.to(self.fp_dtype)
        take = min(self.n_sink - self._held(self.sink), T)
        if take > 0:
            s = lat[:, :take]
            self.sink = s if self.sink is None else torch.cat([self.sink, s], 1)
            lat = lat[:, take:]
        if lat.shape[1] == 0:
            return
        self.res = lat if self.res is None else torch.cat([self.res, lat], 1)
        while self.res.shape[1] - self.R >= self.G:
            blk, self.res = self.res[:, :self.G], self.res[:, self.G:].clone()
            q, s, m = quantize_minmax(blk, 1, self.p.bits)                 # (B, G, r); s (B, 1, r)
            self.codes.append(pack_planar(q.transpose(1, 2).reshape(q.shape[0], -1), self.p.bits))
            self.scales.append(torch.cat([s, m], 1))                        # (B, 2, r)

    def latent(self) -> torch.Tensor:
        """Everything held as fp32 (B, S, r), in append order (dequantized store; reference)."""
        parts = [self.sink.float()] if self.sink is not None else []
        B, G, r = self.batch, self.G, self.r
        for c, sm in zip(self.codes, self.scales):
            q = unpack_planar(c, self.p.bits).float().view(B, r, G).transpose(1, 2)   # (B, G, r)
            parts.append(q * sm[:, :1].float() + sm[:, 1:].float())
        if self.res is not None:
            parts.append(self.res.float())
        return torch.cat(parts, 1) if parts else torch.empty(B, 0, r)

    def nbytes(self) -> int:
        fp = sum(t.numel() * t.element_size() for t in (self.sink, self.res) if t is not None)
        return fp + sum(c.numel() * c.element_size() + s.numel() * s.element_size()
                        for c, s in zip(self.codes, self.scales))

    # ------------------------------------------------------------------ attend

    def keys(self, lat: torch.Tensor) -> torch.Tensor:
        """Rematerialize post-RoPE keys (B, H, S, D) from the latent (B, S, r)."""
        k = (lat @ self.Bk.T + self.bk).unflatten(-1, (self.H, self.D)).transpose(1, 2)
        if self.has_knorm:
            k = self.binding.module("k_norm")(k)
        rot = self.binding.rotary(self.pos)
        if rot is not None:
            from ...compiler.model import apply_rope
            k = apply_rope(k, *rot)
        return k

    def load(self, k, v, h=None):
        raise ConfigError("an xquant cache stores the attention input, not K/V: it cannot be "
                          "filled from another cache's K/V")

    def attend(self, q, k, v, scale, mask, h=None, positions=None):
        """Store the latent of h, then attend over the held latent (reference path). A decode
        step sees the stored state; a multi-token chunk sees its own tokens in full precision
        ("prefill attends in fp, then stores quantized", as KIVI), unless
        quantize_before_attend: then each query sees what streaming would have shown it."""
        if h is None or positions is None:
            raise ConfigError("xquant: the layer did not hand its cache the attention input")
        B, Hq, T, D = q.shape
        L = self.n_held
        lat_new = h.float() @ self.A                                          # (B, T, r)
        self.append_latent(lat_new, positions)
        lat_a = self.latent()                                                 # (B, S, r) stored
        S = lat_a.shape[1]
        if mask is None:  # empty cache, plain causal over the chunk
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]
        if T == 1:
            return self._attend(q, scale, mask, lat_a, None, None)
        lat_b = lat_a.clone()
        lat_b[:, L:L + T] = lat_new                                           # chunk in fp
        if not self.quantize_before_attend:
            return self._attend(q, scale, mask, lat_b, None, None)
        from .kivi import quantized_at
        sel = quantized_at(torch.arange(S), torch.arange(L, L + T), self.G, self.R, self.n_sink)
        return self._attend(q, scale, mask, lat_a, lat_b, sel)

    def _attend(self, q, scale, mask, lat_a, lat_b, sel):
        """Attention over latents: query t sees column j from lat_a where sel[t, j] (or always,
        sel None) else from lat_b. K rematerialized, V folded (module docstring)."""
        B, Hq, T, D = q.shape
        rep = Hq // self.H
        qg = q.float().view(B, self.H, rep, T, D)
        logits = torch.einsum("bhrtd,bhsd->bhrts", qg, self.keys(lat_a)) * scale   # (B,H,r',T,S)
        if sel is not None:
            lb = torch.einsum("bhrtd,bhsd->bhrts", qg, self.keys(lat_b)) * scale
            logits = torch.where(sel, logits, lb)
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        p = torch.softmax(logits, -1)
        if sel is None:
            pl = torch.einsum("bhrts,bsc->bhrtc", p, lat_a)                   # (B, H, r', T, rank)
        else:
            pa = p * sel
            pl = (torch.einsum("bhrts,bsc->bhrtc", pa, lat_a)
                  + torch.einsum("bhrts,bsc->bhrtc", p - pa, lat_b))
        Bv = self.Bv.view(self.H, D, self.r)                                  # (H, D, rank)
        out = torch.einsum("bhrtc,hdc->bhrtd", pl, Bv) + self.bv.view(1, self.H, 1, 1, D)
        return out.reshape(B, Hq, T, D).to(q.dtype)


@register_kind
class XQuant(KVKind):
    name = "xquant"
    Params = XQuantParams
    syntax = "xquant:BITS[:rRANK:gN:resN:sN]"
    needs_binding = True
    loads_kv = False
    reads_input = True

    def parse(self, arg, options, text):
        from ...compiler.spec import KVSpec
        if arg or not options or not options[0].isdigit():
            raise ConfigError(f"--kv '{text}': expected xquant:BITS (2, 4 or 8), options "
                              ":rRANK :gGROUP :resRESIDUAL :sSINK")
        opts: dict = {"bits": int(options[0])}
        for o in options[1:]:
            if o.startswith("res") and o[3:].isdigit():
                opts["residual"] = int(o[3:])
            elif o[:1] in ("r", "g", "s") and o[1:].isdigit():
                opts[{"r": "rank", "g": "group_size", "s": "sink"}[o[0]]] = int(o[1:])
            else:
                raise ConfigError(f"--kv '{text}': unknown option '{o}' (use rRANK, gN, resN, sN)")
        return KVChoice(KVSpec("xquant", XQuantParams(**opts)), ":".join(["xquant", *options]))

    def cache(self, layer, batch, binding):
        return XQuantCache(layer, batch, binding)

    @staticmethod
    def _store_per_token(p: XQuantParams, layer: LayerSpec) -> Fraction:
        r = p.rank_for(layer)
        return Fraction(r * p.bits, 8) + Fraction(2 * SCALE_DTYPE.itemsize * r, p.group_size)

    def bytes_per_token(self, params, layer):
        t = self._store_per_token(params, layer)
        return int(t) if t.denominator == 1 else float(t)

    def held_split(self, p: XQuantParams, n: int) -> tuple[int, int, int]:
        ns = min(p.sink, n)
        rest = n - ns
        nq = max(0, (rest - p.residual) // p.group_size) * p.group_size
        return ns, nq, rest - nq

    def bytes_held(self, params, layer, n_tokens):
        ns, nq, nr = self.held_split(params, n_tokens)
        fp = params.rank_for(layer) * DTYPES[params.dtype].itemsize
        return int((ns + nr) * fp + nq * self._store_per_token(params, layer))

    def cost(self, params, layer, context):
        r, kv, Hq, D = params.rank_for(layer), layer.kv_dim, layer.n_heads, layer.head_dim
        factors = (2 * kv * r) * 4                                         # B_k, B_v fp32
        read = self.bytes_held(params, layer, context) + factors
        flops = (2 * context * r * kv          # K = L·B_kᵀ over the context
                 + 2 * Hq * D * context        # q·Kᵀ
                 + 2 * Hq * context * r        # P·L
                 + 2 * Hq * r * D)             # (P·L)·B_vᵀ
        return KVCost(bytes_read=read, flops=flops)

    def verify_steps(self, params):
        return params.residual + 2 * params.group_size
