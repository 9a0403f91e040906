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

Decode steps run the C++ kernel (runtime/kernels/xquant_attention.py) when it builds: it reads
the packed latent tile by tile and never materializes K or V of the context. `_attend` is the
pure-torch reference (dequantize the latent, rematerialize K over all held tokens) that the
kernel is tested against, and the path for prefill chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from ...compiler.spec import LayerSpec
from ...errors import ConfigError
from ..kvcache import DTYPES, KVCache
from . import KVChoice, KVCost, KVKind, KVParams, exact_number, register_kind, window_split
from .kivi import SCALE_DTYPE, pack_planar, quantize_minmax, unpack_planar

XQ_BITS = (2, 4, 8)
BASES = ("split", "stacked")


@dataclass(frozen=True)
class XQuantParams(KVParams):
    bits: int = 4
    rank: int = 0                  # 0 = full rank (2·kv_dim)
    group_size: int = 32
    residual: int = 128
    sink: int = 0
    dtype: str = "float32"         # fp residual / sink storage
    basis: str = "split"           # split: X·A_k and X·A_v | stacked: X·A of [W_k; W_v]
    # divide each token's per-channel part by its RMS (stored fp16) before quantizing: "auto" =
    # on for layers with a K norm (qwen3, gemma3), whose k_norm rescales every key to unit RMS
    # and so turns a small key's absolute error into a large relative one
    token_scale: str = "auto"      # auto | on | off

    def __post_init__(self):
        if self.token_scale not in ("auto", "on", "off"):
            raise ConfigError(f"kv xquant: token_scale '{self.token_scale}' not in auto, on, off")
        if self.basis not in BASES:
            raise ConfigError(f"kv xquant: basis '{self.basis}' not in {', '.join(BASES)}")
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

    def split_ranks(self, layer: LayerSpec) -> tuple[int, int]:
        """(channels quantized per channel, channels quantized per token): split gives the K
        latent the first half and the V latent the second; stacked quantizes all per channel."""
        r = self.rank_for(layer)
        return (r - r // 2, r // 2) if self.basis == "split" else (r, 0)

    def token_scaled(self, layer: LayerSpec) -> bool:
        return self.token_scale == "on" or (self.token_scale == "auto" and layer.qk_norm)

    def v_group(self, layer: LayerSpec) -> int:
        rv = self.split_ranks(layer)[1]
        return min(self.group_size, rv) if rv else 1

    def label(self) -> str:
        return (f"xquant-x{self.bits}" + (f"-r{self.rank}" if self.rank else "")
                + {"auto": "", "on": "-ts", "off": "-nots"}[self.token_scale]
                + ("-stacked" if self.basis == "stacked" else "")
                + f"-g{self.group_size}-res{self.residual}" + (f"-s{self.sink}" if self.sink else ""))

    def check_layer(self, layer: LayerSpec) -> None:
        r = self.rank_for(layer)
        if r > 2 * layer.kv_dim:
            raise ConfigError(f"kv xquant: rank {r} exceeds the layer's stacked K/V rank "
                              f"2·kv_dim = {2 * layer.kv_dim}")
        rk, rv = self.split_ranks(layer)
        if self.basis == "split" and max(rk, rv) > layer.kv_dim:
            raise ConfigError(f"kv xquant: rank {r} split as {rk} + {rv} exceeds kv_dim = "
                              f"{layer.kv_dim} per half")
        if self.bits != 8 and (rk * self.group_size) % (8 // self.bits):
            raise ConfigError(f"kv xquant: {rk}×{self.group_size} codes cannot be packed at "
                              f"{self.bits} bits")
        if rv and rv % self.v_group(layer):
            raise ConfigError(f"kv xquant: the V latent's {rv} channels are not a multiple of "
                              f"the group {self.v_group(layer)}")


def weight_of(mod) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias or None) of a linear, fp32 (dequantized if quantized)."""
    w = mod.dequantize() if hasattr(mod, "dequantize") else mod.weight
    return w.detach().float(), (None if getattr(mod, "bias", None) is None
                                else mod.bias.detach().float())


def kv_weights(binding, layer: LayerSpec):
    """(W_k, W_v (kv_dim, hidden), b_k, b_v (kv_dim,)) fp32 from the layer's current K/V
    projections (dequantized if quantized; sliced from a fused qkv_proj; zero biases if none)."""
    q, kv = layer.q_dim, layer.kv_dim
    if binding.has("k_proj"):
        (wk, bk), (wv, bv) = weight_of(binding.module("k_proj")), weight_of(binding.module("v_proj"))
    elif binding.has("qkv_proj"):
        w, b = weight_of(binding.module("qkv_proj"))
        wk, wv = w[q:q + kv], w[q + kv:q + 2 * kv]
        bk, bv = (None, None) if b is None else (b[q:q + kv], b[q + kv:q + 2 * kv])
    else:
        raise ConfigError(f"{layer.kv.kind}: layer {binding.layer} has no k_proj/v_proj (or "
                          "qkv_proj) whose input is the attention input")
    zeros = torch.zeros(kv)
    return wk, wv, (zeros if bk is None else bk), (zeros if bv is None else bv)


def right_basis(w: torch.Tensor, n: int) -> torch.Tensor:
    """The n leading right singular vectors of w (rows, hidden) → (hidden, n), float64."""
    _, _, vh = torch.linalg.svd(w.double(), full_matrices=False)         # vh: (rows, hidden)
    return vh[:n].T.contiguous()


def latent_factors(binding, layer: LayerSpec, params: "XQuantParams"):
    """(A (hidden, r), B_k (kv_dim, rk'), B_v (kv_dim, rv'), b_k, b_v) from the layer's current
    K/V projection weights. Stacked: one basis of [W_k; W_v], B_k and B_v over all r channels.
    Split: A = [A_k | A_v], the right singular bases of W_k and W_v, B_k over the first rk
    channels and B_v over the rest."""
    wk, wv, bk, bv = kv_weights(binding, layer)
    hidden = wk.shape[1]
    widest = params.rank_for(layer) if params.basis == "stacked" else max(params.split_ranks(layer))
    if widest > hidden:
        # W_k, W_v (and [W_k; W_v]) have rank ≤ hidden: a wider basis does not exist, and a latent
        # that wide would also be larger than X itself
        raise ConfigError(f"kv xquant: a latent of {widest} channels per basis exceeds the layer "
                          f"input width {hidden} (layer {binding.layer}); use :rRANK with RANK ≤ "
                          f"{hidden if params.basis == 'stacked' else 2 * hidden}")
    basis = right_basis
    if params.basis == "stacked":
        A = basis(torch.cat([wk, wv], 0), params.rank_for(layer))         # (hidden, r)
        return A.float(), (wk.double() @ A).float(), (wv.double() @ A).float(), bk, bv
    rk, rv = params.split_ranks(layer)
    Ak, Av = basis(wk, rk), basis(wv, rv)
    return (torch.cat([Ak, Av], 1).float(), (wk.double() @ Ak).float(),
            (wv.double() @ Av).float(), bk, bv)


def latent_store_bytes(bits: int, rk: int, rv: int, group: int, v_group: int,
                       token_scaled: bool) -> Fraction:
    """Amortized bytes of one token in a quantized latent store (XQuantCache._init_store): rk + rv
    codes at `bits`, an fp16 scale and min per per-channel column shared by the G tokens of a
    block, per (token, group of v_group) of the rv per-token columns, and the token's fp16 RMS
    when token_scaled. Shared by every kind that stores a latent (xquant, palu, eigen, think)."""
    sb = SCALE_DTYPE.itemsize
    return (Fraction((rk + rv) * bits, 8) + Fraction(2 * sb * rk, group)
            + (2 * sb * (rv // v_group) if rv else 0) + (sb if token_scaled else 0))


def latent_bytes_held(p, rk: int, rv: int, v_group: int, token_scaled: bool,
                      n_tokens: int) -> int:
    """Exact bytes a latent store holds after n tokens: p.bits == 0 keeps every token in the fp
    window (p.dtype); otherwise the sink and residual tokens are fp and the rest quantized
    (KIVI's schedule, window_split)."""
    fp = (rk + rv) * DTYPES[p.dtype].itemsize
    if not p.bits:
        return n_tokens * fp
    ns, nq, nr = window_split(n_tokens, p.sink, p.residual, p.group_size)
    return int((ns + nr) * fp + nq * latent_store_bytes(p.bits, rk, rv, p.group_size, v_group,
                                                        token_scaled))


class XQuantCache(KVCache):
    """Latent store for one layer: [sink (fp) | quantized blocks | residual (fp)] in append order."""

    #: False: the latent is rematerialized into K through B_k (then k_norm, RoPE); True: it holds
    #: per-head key/value coordinates that queries in the basis read directly (ProjectedKVCache)
    projected = False

    def __init__(self, layer: LayerSpec, batch: int, binding):
        super().__init__(layer, batch, binding)
        p = layer.kv.params
        self.A, self.Bk, self.Bv, self.bk, self.bv = latent_factors(binding, layer, p)
        self._init_store(p, p.bits, p.rank_for(layer), *p.split_ranks(layer), p.v_group(layer),
                         p.token_scaled(layer), split=p.basis == "split")

    def _init_store(self, p, bits, r, rk, rv, gv, tok_scale, split):
        """The latent store's geometry (shared with kinds that store other latents: xquant-cl):
        r channels, the first rk quantized per channel at `bits` (over blocks of G tokens, divided
        by the token RMS first if tok_scale), the other rv per token in groups of gv."""
        layer, batch, binding = self.layer, self.batch, self.binding
        self.p, self.bits, self.r = p, bits, r
        self.G, self.R, self.n_sink = p.group_size, p.residual, p.sink
        self.H, self.D = layer.n_kv_heads, layer.head_dim
        self.fp_dtype = DTYPES[p.dtype]
        self.rk, self.rv = rk, rv                          # per-channel | per-token channels
        self.gv = gv
        self.tok_scale = tok_scale
        # which latent channels K and V are made of
        self.k_cols = slice(0, self.rk) if split else slice(0, self.r)
        self.v_cols = slice(self.rk, self.r) if split else slice(0, self.r)
        self.has_knorm = binding.has("k_norm")
        self.sink = self.res = None                 # (B, n, r) fp
        self._res_buf = None                        # the fp window's storage (`_grow_res`)
        # the quantized store, one row per block of G tokens (dim 1), contiguous so the reference
        # dequantizes it in a few vector ops:
        #   codes   (B, nb, G·rk·bits/8) uint8, the per-channel part, channel-major in a block
        #   scales  (B, nb, 2, rk) fp16 scale/min of it
        #   nscales (B, nb, G, 1) fp16 token RMS (token_scale only)
        #   tcodes  (B, nb, G·rv·bits/8) uint8, the per-token part, token-major
        #   tscales (B, nb, 2, G, rv/gv) fp16 scale/min of it
        self.store: dict[str, torch.Tensor] = {}
        self.nb = 0
        self.pos = torch.empty(batch, 0, dtype=torch.long)   # positions of held tokens, in order
        self.last_path = None

    # ------------------------------------------------------------------ store

    @property
    def n_q(self) -> int:
        return self.nb * self.G

    def _push(self, name: str, t: torch.Tensor) -> None:
        """Append one block's tensor (B, ...) as row nb of store[name]."""
        old = self.store.get(name)
        self.store[name] = t[:, None] if old is None else torch.cat([old, t[:, None]], 1)

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
        self._grow_res(lat)
        while self.res.shape[1] - self.R >= self.G:
            blk, rest = self.res[:, :self.G].float().clone(), self.res[:, self.G:].clone()
            self._res_buf[:, :rest.shape[1]] = rest
            self.res = self._res_buf[:, :rest.shape[1]]
            self._flush_block(blk)
            self.nb += 1

    def _grow_res(self, lat: torch.Tensor) -> None:
        """Append rows to the fp window. It lives in a buffer that grows by doubling (as
        DenseKVCache's) and `res` is the held prefix of it: an fp latent (bits 0) keeps the whole
        context there, and re-concatenating it at every decode step would copy the cache each
        token (at 8k tokens that copy, not attention, dominated the step)."""
        n, T = self._held(self.res), lat.shape[1]
        buf = self._res_buf
        if buf is None or buf.shape[1] < n + T:
            cap = max(n + T, 2 * (0 if buf is None else buf.shape[1]), 64)
            new = torch.empty(lat.shape[0], cap, lat.shape[2], dtype=lat.dtype)
            if n:
                new[:, :n] = self.res
            self._res_buf = buf = new
        buf[:, n:n + T] = lat
        self.res = buf[:, :n + T]

    #: codes, fp16 scale and min of x reduced over a dim (x ≈ scale·code + min)
    quantize = staticmethod(quantize_minmax)

    def _flush_block(self, blk: torch.Tensor) -> None:
        """Quantize one block (B, G, r) of the fp window into the store (row nb)."""
        B, G = blk.shape[:2]
        part = blk[..., :self.rk]
        if self.tok_scale:
            n = part.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-4).to(SCALE_DTYPE)
            self._push("nscales", n)                                        # (B, G, 1)
            part = part / n.float()
        q, s, m = self.quantize(part, 1, self.bits)                         # (B, G, rk); (B, 1, rk)
        self._push("codes", pack_planar(q.transpose(1, 2).reshape(B, -1), self.bits))
        self._push("scales", torch.cat([s, m], 1))                          # (B, 2, rk)
        if self.rv:
            tv = blk[..., self.rk:].reshape(B, G, self.rv // self.gv, self.gv)
            q, s, m = self.quantize(tv, 3, self.bits)                       # s: (B, G, ng, 1)
            self._push("tcodes", pack_planar(q.reshape(B, -1), self.bits))
            self._push("tscales", torch.stack([s[..., 0], m[..., 0]], 1))   # (B, 2, G, ng)

    def latent(self) -> torch.Tensor:
        """Everything held as fp32 (B, S, r), in append order (dequantized store; reference)."""
        parts = [self.sink.float()] if self.sink is not None else []
        if self.nb:
            parts.append(self.store_latent())
        if self.res is not None:
            parts.append(self.res.float())
        return torch.cat(parts, 1) if parts else torch.empty(self.batch, 0, self.r)

    def store_latent(self) -> torch.Tensor:
        """The quantized store dequantized, (B, n_q, r) fp32."""
        B, G, rk, rv, gv = self.batch, self.G, self.rk, self.rv, self.gv
        st, nb = self.store, self.nb
        if nb == 0:
            return torch.empty(B, 0, self.r)
        q = unpack_planar(st["codes"], self.bits).float().view(B, nb, rk, G).transpose(2, 3)
        sm = st["scales"].float()                                             # (B, nb, 2, rk)
        blk = q * sm[:, :, :1] + sm[:, :, 1:]                                 # (B, nb, G, rk)
        if self.tok_scale:
            blk = blk * st["nscales"].float()
        if rv:
            qt = unpack_planar(st["tcodes"], self.bits).float().view(B, nb, G, rv // gv, gv)
            ts = st["tscales"].float()                                        # (B, nb, 2, G, ng)
            tv = qt * ts[:, :, 0, ..., None] + ts[:, :, 1, ..., None]
            blk = torch.cat([blk, tv.reshape(B, nb, G, rv)], -1)
        return blk.reshape(B, nb * G, -1)

    def quantized_span(self):
        ns = self._held(self.sink)
        return ns, ns + self.n_q

    def nbytes(self) -> int:
        fp = sum(t.numel() * t.element_size() for t in (self.sink, self.res) if t is not None)
        return fp + sum(t.numel() * t.element_size() for t in self.store.values())

    # ------------------------------------------------------------------ attend

    def keys(self, lat: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Rematerialize post-RoPE keys (B, H, S, D) from the latent (B, S, r) of the tokens at
        `pos` (B, S) (default: every held token's)."""
        k = (lat[..., self.k_cols] @ self.Bk.T + self.bk).unflatten(-1, (self.H, self.D)).transpose(1, 2)
        if self.has_knorm:
            k = self.binding.module("k_norm")(k)
        rot = self.binding.rotary(self.pos if pos is None else pos)
        if rot is not None:
            from ...compiler.model import apply_rope
            k = apply_rope(k, *rot)
        return k

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The latent of the attention input h (B, T, hidden) → (B, T, r)."""
        return h.float() @ self.A

    def encode(self, k, v, h, positions) -> torch.Tensor:
        """The latent (B, T, r) the cache stores for new tokens: here X·A of the attention input
        (a kind that projects K/V themselves, eigen, overrides this)."""
        if h is None or positions is None:
            raise ConfigError(f"{self.layer.kv.kind}: the layer did not hand its cache the "
                              "attention input")
        return self.project(h)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """The queries in the basis `keys` returns (identity here: K is rematerialized at
        head_dim; eigen attends in its low-rank basis and projects q into it)."""
        return q.float()

    def load(self, k, v, h=None):
        raise ConfigError("an xquant cache stores the attention input, not K/V: it cannot be "
                          "filled from another cache's K/V")

    def attend(self, q, k, v, scale, mask, h=None, positions=None):
        """Store the latent of h, then attend over the held latent (reference path). A decode
        step sees the stored state; a multi-token chunk sees its own tokens in full precision
        ("prefill attends in fp, then stores quantized", as KIVI), unless
        quantize_before_attend: then each query sees what streaming would have shown it."""
        B, Hq, T, D = q.shape
        L = self.n_held
        lat_new = self.encode(k, v, h, positions)                             # (B, T, r)
        if positions is None:
            positions = torch.arange(self.length, self.length + T).expand(B, T)
        self.append_latent(lat_new, positions)
        S = self.n_held
        if mask is None:  # empty cache, plain causal over the chunk
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]
        if T == 1:
            out = self.fast_decode(q, scale, mask)
            if out is not None:
                self.last_path = "kernel"
                return out
            self.last_path = "reference"
            return self._attend(q, scale, mask, self.latent(), None, None)
        lat_a = self.latent()                                                 # (B, S, r) stored
        lat_b = lat_a.clone()
        lat_b[:, L:L + T] = lat_new                                           # chunk in fp
        if not self.quantize_before_attend:
            # a prefill chunk: K and V of the held context are materialized once for SDPA's
            # memory-efficient kernel (T×S logits of a long chunk would not fit); decode steps
            # never materialize V
            K = self.keys(lat_b)                                              # (B, H, S, D)
            V = self.values(lat_b)
            return F.scaled_dot_product_attention(self.queries(q), K, V, attn_mask=mask,
                                                  scale=scale, enable_gqa=Hq != self.H).to(q.dtype)
        from .kivi import quantized_at
        sel = quantized_at(torch.arange(S), torch.arange(L, L + T), self.G, self.R, self.n_sink)
        return self._attend(q, scale, mask, lat_a, lat_b, sel)

    def fast_decode(self, q, scale, mask):
        """One decode step through a fast kernel that reads the packed store directly, or None
        when no kernel applies (the caller then runs the reference `_attend`)."""
        from ..kernels import xquant_attention as xa
        return xa.decode(self, q, scale, mask) if xa.use_kernel(self) else None

    def _attend(self, q, scale, mask, lat_a, lat_b, sel):
        """Attention over latents: query t sees column j from lat_a where sel[t, j] (or always,
        sel None) else from lat_b. K rematerialized, V folded (module docstring)."""
        B, Hq, T, D = q.shape
        rep = Hq // self.H
        qg = self.queries(q).view(B, self.H, rep, T, -1)
        logits = torch.einsum("bhrtd,bhsd->bhrts", qg, self.keys(lat_a)) * scale   # (B,H,r',T,S)
        if sel is not None:
            lb = torch.einsum("bhrtd,bhsd->bhrts", qg, self.keys(lat_b)) * scale
            logits = torch.where(sel, logits, lb)
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        p = torch.softmax(logits, -1)
        va = lat_a[..., self.v_cols]
        if sel is None:
            pl = self.mix_values(p, va)
        else:
            pa = p * sel
            pl = self.mix_values(pa, va) + self.mix_values(p - pa, lat_b[..., self.v_cols])
        return self.values_out(pl).reshape(B, Hq, T, D).to(q.dtype)

    def values(self, lat: torch.Tensor) -> torch.Tensor:
        """V (B, H, S, D) of the latent (B, S, r): the prefill path's SDPA takes it whole."""
        return (lat[..., self.v_cols] @ self.Bv.T + self.bv).unflatten(-1, (self.H, self.D)).transpose(1, 2)

    def mix_values(self, p: torch.Tensor, v_lat: torch.Tensor) -> torch.Tensor:
        """Attention weights p (B, H, r', T, S) applied to the V latent (B, S, rv): (B, H, r', T, rv)
        (every query head reads the whole latent: B_v mixes all of its channels)."""
        return torch.einsum("bhrts,bsc->bhrtc", p, v_lat)

    def values_out(self, pl: torch.Tensor) -> torch.Tensor:
        """(B, H, r', T, rv) latent outputs → (B, H, r', T, D): B_v of each query's KV group, then
        b_v (p's rows sum to 1)."""
        Bv = self.Bv.view(self.H, self.D, -1)                                 # (H, D, rv)
        return torch.einsum("bhrtc,hdc->bhrtd", pl, Bv) + self.bv.view(1, self.H, 1, 1, self.D)


@register_kind
class XQuant(KVKind):
    name = "xquant"
    Params = XQuantParams
    syntax = "xquant:BITS[:rRANK:gN:resN:sN:split|stacked:ts|nots]"
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
            elif o in BASES:
                opts["basis"] = o
            elif o in ("ts", "nots"):
                opts["token_scale"] = "on" if o == "ts" else "off"
            elif o[:1] in ("r", "g", "s") and o[1:].isdigit():
                opts[{"r": "rank", "g": "group_size", "s": "sink"}[o[0]]] = int(o[1:])
            else:
                raise ConfigError(f"--kv '{text}': unknown option '{o}' (use rRANK, gN, resN, sN, "
                                  "split, stacked, ts, nots)")
        return KVChoice(KVSpec("xquant", XQuantParams(**opts)), ":".join(["xquant", *options]))

    def cache(self, layer, batch, binding):
        return XQuantCache(layer, batch, binding)

    def bytes_per_token(self, params, layer):
        return exact_number(latent_store_bytes(params.bits, *params.split_ranks(layer),
                                               params.group_size, params.v_group(layer),
                                               params.token_scaled(layer)))

    def held_split(self, p: XQuantParams, n: int) -> tuple[int, int, int]:
        return window_split(n, p.sink, p.residual, p.group_size)

    def bytes_held(self, params, layer, n_tokens):
        return latent_bytes_held(params, *params.split_ranks(layer), params.v_group(layer),
                                 params.token_scaled(layer), n_tokens)

    def cost(self, params, layer, context):
        kv, Hq, D = layer.kv_dim, layer.n_heads, layer.head_dim
        rk, rv = params.split_ranks(layer)
        if params.basis == "stacked":
            rk = rv = params.rank_for(layer)
        factors = kv * (rk + rv) * 4                                       # B_k, B_v fp32
        read = self.bytes_held(params, layer, context) + factors
        flops = (2 * context * rk * kv         # K = L_k·B_kᵀ over the context
                 + 2 * Hq * D * context        # q·Kᵀ
                 + 2 * Hq * context * rv       # P·L_v
                 + 2 * Hq * rv * D)            # (P·L_v)·B_vᵀ
        return KVCost(bytes_read=read, flops=flops)

    def verify_steps(self, params):
        return params.residual + 2 * params.group_size
