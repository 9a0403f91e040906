"""cskv: channel-shrunk KV with a bi-branch cache (CSKV, arXiv 2409.10593), training-free form.

CSKV factors the K and V projections into low-rank pairs (its §3.2, SVD-initialized; here the
whitened SVD of Palu/SVD-LLM, which minimizes the projection's output error on the calibration
activations, computed by the same pass as palu: mcomp/passes/palu.py) and stores the
low-dimensional features h = X·A of older tokens, but keeps a window of the most recent tokens
in full precision (§3.3, the "bi-branch KV cache"): local attention, which carries most of the
attention mass, stays exact, and only the long tail pays for the rank truncation.

Per layer the cache holds, in column (append) order,

    [ latent store: every token older than the window | window: the last `window` tokens ]

- the latent store is palu's (runtime/kv/palu.py): fp latents, or with `:kivi2/4/8` the KIVI
  quantizer over them (sink | quantized blocks | fp residual, residual 0 by default: the window
  is already the exact recent branch); K is rematerialized from it (then k_norm, RoPE), V is
  applied in the latent and projected once per query head;
- the window holds each recent token's exact post-RoPE K and V, and its latent, which enters the
  store when the token ages out (the attention input is gone by then). Window tokens are the
  bounded overhead `window` × (2·kv_dim + latent) at `dtype` that bytes_held counts;
  bytes_per_token is the store's amortized cost, as for KIVI's residual.

CSKV's layer-wise reconstruction fine-tuning (§3.4) is not built: the training-free factors are
the SVD initialization the paper fine-tunes from.

Shorthand: `cskv:RATIO` (fraction of K/V channels removed over the model, 0 < RATIO < 1) with
`:wN` (window, default 32, CSKV's choice), `:fisher` (Palu's Fisher rank allocation instead of
CSKV's uniform ranks), `:hgN` (KV heads per decomposition group), `:kivi2|:kivi4|:kivi8` with
`:gN :rN :sN` (the quantized store), `:white` / `:pca` (latent scaling, as palu), `:fp16` /
`:bf16` (the window and fp latents at that width).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ..kvcache import DTYPES
from . import KVChoice, KVCost, register_kind
from .kivi import quantized_at
from .palu import Palu, PaluCache, PaluParams


_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class CSKVParams(PaluParams):
    allocation: str = "uniform"   # CSKV shrinks every layer alike; :fisher allocates as Palu
    residual: int = 0             # the store's fp latent window: the exact window replaces it
    window: int = 32              # recent tokens kept as exact K/V

    def __post_init__(self):
        super().__post_init__()
        if type(self.window) is not int or self.window < 1:
            raise ConfigError(f"kv cskv: window must be an integer >= 1, got {self.window!r}")

    def label(self) -> str:
        palu = dataclasses.replace(self, allocation="fisher")      # palu's label minus allocation
        return ("cskv" + PaluParams.label(palu)[len("palu"):] + f"-w{self.window}"
                + ("-fisher" if self.allocation == "fisher" else ""))


class CSKVCache(PaluCache):
    """Palu's latent store for tokens older than the window, exact K/V for the window."""

    def __init__(self, layer, batch, binding):
        super().__init__(layer, batch, binding)
        self.W = layer.kv.params.window
        self.win_k = self.win_v = None          # (B, H, w, D) exact post-RoPE K, V
        self.win_lat = None                     # (B, w, r) their latents
        self.win_pos = None                     # (B, w)

    @property
    def n_win(self) -> int:
        return 0 if self.win_k is None else self.win_k.shape[2]

    def nbytes(self) -> int:
        win = sum(t.numel() * t.element_size() for t in (self.win_k, self.win_v, self.win_lat)
                  if t is not None)
        return super().nbytes() + win

    def _push_window(self, k, v, lat, positions) -> None:
        """Append new tokens to the window; tokens beyond `window` age out into the store."""
        dt = self.fp_dtype
        k, v, lat = k.to(dt), v.to(dt), lat.to(dt)
        cat = (lambda a, b, d: b if a is None else torch.cat([a, b], d))
        self.win_k, self.win_v = cat(self.win_k, k, 2), cat(self.win_v, v, 2)
        self.win_lat, self.win_pos = cat(self.win_lat, lat, 1), cat(self.win_pos, positions, 1)
        n = self.n_win - self.W
        if n > 0:
            self.append_latent(self.win_lat[:, :n], self.win_pos[:, :n])
            self.length -= n            # append_latent counts tokens the window already counted
            self.win_k, self.win_v = self.win_k[:, :, n:].clone(), self.win_v[:, :, n:].clone()
            self.win_lat, self.win_pos = self.win_lat[:, n:].clone(), self.win_pos[:, n:].clone()

    def load(self, k, v, h=None):
        raise ConfigError("a cskv cache stores the attention input's latent for older tokens: "
                          "it cannot be filled from another cache's K/V")

    def attend(self, q, k, v, scale, mask, h=None, positions=None):
        """Store the new tokens (window, ageing out into the latent store), then attend over
        [store (rematerialized K, latent V) | window (exact)] in one softmax. A prefill chunk
        sees its own tokens exactly (as KIVI's "prefill attends in fp"); in quantize-before-
        attend mode each query sees what streaming would have shown it: exact within `window`
        tokens of itself, the latent beyond, quantized where the store would have flushed it."""
        if h is None or positions is None:
            raise ConfigError("cskv: the layer did not hand its cache the attention input")
        B, Hq, T, D = q.shape
        L = self.n_held
        lat_new = self.project(h)                                       # (B, T, r)
        self.length += T
        self._all_pos = positions
        self._push_window(k, v, lat_new, positions)
        S = self.n_held
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]
        if T == 1:      # before latent(): the kernel reads the packed store itself
            out = self.fast_decode(q, scale, mask)
            self.last_path = "reference" if out is None else "kernel"
            if out is not None:
                return out
        store = self.latent()                                           # (B, S − w, r), as held
        if T > 1 and self.quantize_before_attend:
            if L:
                raise ConfigError("cskv: quantize-before-attend runs on whole windows from an "
                                  "empty cache")
            return self._attend_streaming(q, k, v, lat_new, store, scale, mask)
        ns = store.shape[1]
        KS = self.keys(store).float()                                   # (B, H, ns, D)
        KW, VW = self.win_k.float(), self.win_v.float()
        if T > 1:       # a chunk attends to its own tokens exactly, those in the store too
            c0 = L                                                      # first chunk column
            exact_k = torch.cat([KS, KW], 2)
            exact_k[:, :, c0:c0 + T] = k.float()
            lat_v = torch.cat([store[..., self.v_cols], self.win_lat[..., self.v_cols].float()], 1)
            is_exact = torch.zeros(S, dtype=torch.bool)
            is_exact[c0:] = True
            is_exact[ns:] = True
            V_exact = torch.zeros(B, self.H, S, D)
            V_exact[:, :, ns:] = VW
            V_exact[:, :, c0:c0 + T] = v.float()
            return self._mixed(q, exact_k, lat_v, V_exact, is_exact[None], scale, mask)
        keys = torch.cat([KS, KW], 2)
        lat_v = torch.cat([store[..., self.v_cols], torch.zeros(B, self.n_win, self.r)[..., self.v_cols]], 1)
        V_exact = torch.cat([torch.zeros(B, self.H, ns, D), VW], 2)
        is_exact = torch.arange(S) >= ns
        return self._mixed(q, keys, lat_v, V_exact, is_exact[None], scale, mask)

    def _attend_streaming(self, q, k, v, lat_new, store, scale, mask):
        """Quantize-before-attend over a whole window from an empty cache: column j is exact
        for query c iff c − j < window; else its latent, quantized iff the store (which token j
        entered at step j + window) had flushed it by step c. Three logit sources selected per
        (query, column), one softmax."""
        B, Hq, T, D = q.shape
        p = self.p
        c = torch.arange(T)[:, None]
        exact = (c - torch.arange(T)[None, :]) < self.W                  # (T, S)
        lat_fp = lat_new.float()
        lat_q = lat_fp.clone()
        lat_q[:, :store.shape[1]] = store                                # stored (quantized) state
        if p.bits:
            # the store's column j receives token j; at query c it holds c − W + 1 tokens
            quant = ~exact & quantized_at(torch.arange(T), torch.arange(T) - self.W,
                                          p.group_size, p.residual, p.sink)
        else:
            quant = torch.zeros(T, T, dtype=torch.bool)
        fp = ~exact & ~quant
        rep = Hq // self.H
        qg = q.float().view(B, self.H, rep, T, D)
        K_fp, K_q = self.keys(lat_fp, self._all_pos), self.keys(lat_q, self._all_pos)
        lg = [torch.einsum("bhrtd,bhsd->bhrts", qg, K) * scale for K in (k.float(), K_fp, K_q)]
        logits = torch.where(exact, lg[0], torch.where(quant, lg[2], lg[1]))
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        P = torch.softmax(logits, -1)
        out = torch.einsum("bhrts,bhsd->bhrtd", P * exact, v.float())
        pl = (torch.einsum("bhrts,bsc->bhrtc", P * fp, lat_fp[..., self.v_cols])
              + torch.einsum("bhrts,bsc->bhrtc", P * quant, lat_q[..., self.v_cols]))
        out = out + torch.einsum("bhrtc,hdc->bhrtd", pl, self.Bv.view(self.H, D, -1))
        out = out + self.bv.view(1, self.H, 1, 1, D) * (P * ~exact).sum(-1, keepdim=True)
        return out.reshape(B, Hq, T, D).to(q.dtype)

    def _mixed(self, q, K, lat_v, V_exact, is_exact, scale, mask):
        """One softmax over columns whose K is given (B, H, S, D); V is exact (V_exact) where
        is_exact (1, S), else P·lat_v projected by B_v (+ b_v for the latent columns' mass)."""
        B, Hq, T, D = q.shape
        rep = Hq // self.H
        qg = q.float().view(B, self.H, rep, T, D)
        logits = torch.einsum("bhrtd,bhsd->bhrts", qg, K) * scale
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        P = torch.softmax(logits, -1)
        pe = P * is_exact.float()
        out = torch.einsum("bhrts,bhsd->bhrtd", pe, V_exact)
        pl = torch.einsum("bhrts,bsc->bhrtc", P - pe, lat_v)
        out = out + torch.einsum("bhrtc,hdc->bhrtd", pl, self.Bv.view(self.H, D, -1))
        out = out + self.bv.view(1, self.H, 1, 1, D) * (P - pe).sum(-1, keepdim=True)
        return out.reshape(B, Hq, T, D).to(q.dtype)

    def fast_decode(self, q, scale, mask):
        """One decode step as two softmaxes merged by their log-sum-exp: the store's columns
        through the xquant kernel (K rematerialized tile by tile from the packed latent, V in the
        latent), the window's exact K/V in torch (≤ `window` columns). None when the kernel does
        not apply."""
        from ..kernels import xquant_attention as xa
        if not xa.use_kernel(self):
            return None
        B, Hq, _, D = q.shape
        ns, rep = self.n_held - self.n_win, Hq // self.H
        mask = mask.reshape(mask.shape[0], -1).expand(B, -1)              # (B, S)
        lw = torch.einsum("bhrd,bhsd->bhrs", q.float().view(B, self.H, rep, D),
                          self.win_k.float()) * scale
        lw = lw.masked_fill(~mask[:, None, None, ns:], float("-inf"))
        out = torch.softmax(lw, -1).nan_to_num(0.) @ self.win_v.float()        # (B, H, rep, D)
        out = out.reshape(B, Hq, 1, D)
        if ns:
            out_s, lse_s = xa.decode(self, q, scale, mask[:, None, None, :ns], with_lse=True)
            lse = torch.stack([lse_s.float(), lw.logsumexp(-1).reshape(B, Hq, 1, 1)])
            w = torch.softmax(lse, 0).nan_to_num(0.)                      # the two parts' mass
            out = w[0] * out_s.float() + w[1] * out
        return out.to(q.dtype)


@register_kind
class CSKV(Palu):
    name = "cskv"
    Params = CSKVParams
    syntax = "cskv:RATIO[:wN:fisher:hgN:fp16|bf16:kivi2|:kivi4|:kivi8:gN:rN:sN:white|pca]"
    loads_kv = False

    def parse(self, arg, options, text):
        from ...compiler.spec import KVSpec
        extra: dict = {}
        rest = []
        for o in options[1:]:
            if o.startswith("w") and o[1:].isdigit():
                extra["window"] = int(o[1:])
            elif o == "fisher":
                extra["allocation"] = "fisher"
            elif o in _DTYPES:
                extra["dtype"] = _DTYPES[o]
            elif o == "uniform":
                raise ConfigError(f"--kv '{text}': cskv allocates uniformly by default (:fisher "
                                  "for Palu's allocation)")
            else:
                rest.append(o)
        try:
            palu = Palu.parse(self, arg, options[:1] + rest, text.replace("cskv", "palu", 1))
        except ConfigError as e:
            raise ConfigError(str(e).replace("palu", "cskv").replace(", uniform", ", w, fisher, "
                                                                     "fp16, bf16")) from None
        fields = dataclasses.asdict(palu.spec.params)
        fields.pop("allocation")
        if not any(o[:1] == "r" and o[1:].isdigit() for o in rest):
            fields.pop("residual")      # CSKVParams' default (0): the window is the fp branch
        params = CSKVParams(**{**fields, **extra})
        return KVChoice(KVSpec("cskv", params), ":".join(["cskv", *options]), assign="cskv")

    def cache(self, layer, batch, binding):
        return CSKVCache(layer, batch, binding)

    def _window_bytes(self, params, layer, n_tokens) -> int:
        w = min(n_tokens, params.window)
        return w * (2 * layer.kv_dim + sum(params.latent_split(layer))) * DTYPES[params.dtype].itemsize

    def bytes_held(self, params, layer, n_tokens):
        w = min(n_tokens, params.window)
        return super().bytes_held(params, layer, n_tokens - w) + self._window_bytes(params, layer, n_tokens)

    def cost(self, params, layer, context):
        w = min(context, params.window)
        c = super().cost(params, layer, context - w)
        win = self._window_bytes(params, layer, context)
        return KVCost(bytes_read=c.bytes_read + win,
                      flops=c.flops + 2 * 2 * layer.n_heads * layer.head_dim * w)

    def verify_steps(self, params):
        return params.window + ((params.residual + 2 * params.group_size) if params.bits else 4)
