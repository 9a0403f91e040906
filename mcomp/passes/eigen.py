"""eigen: calibrate Eigen Attention's per-head K/V bases and give every layer an `eigen` cache.

Eigen Attention (arXiv 2408.05646, §3) stacks a head's calibration activations into a
representation matrix R (tokens × D), takes its SVD R = U Σ Vᵀ and keeps the r leading right
singular vectors as the head's basis, r chosen by an energy threshold on Σ; attention then runs
on the projections. Here, per layer, KV head and for K and V separately, with x the post-RoPE
keys (the values) the attention node receives over the calibration windows, c = Σ_t xᵀx their
second moment (float64, D × D, so no activation matrix is held) and g a D × D metric:

1. The rank-r map x ↦ x E Dᵀ (E, D: D × r) that minimizes the error in the metric,
   Σ_t ‖(x − x E Dᵀ) g^{1/2}‖², is (Eckart–Young after whitening by c^{1/2}; `fitted_bases`)

       c^{1/2} g c^{1/2} = U S² Uᵀ,   E = c^{-1/2} U_r S_r,   D = c^{1/2} U_r S_r⁻¹,

   with relative error sqrt(Σ_{i>r} S_i² / Σ_i S_i²). `basis="pca"` takes g = I: then E = D = the
   top-r eigenvectors of c, Eigen Attention's orthonormal PCA basis. `basis="aware"` (default)
   takes for keys g = the second moment of the queries that read this KV head (summed over its
   GQA group), so the error measured is that of the logits q·kᵀ (for q independent of k), and for
   values g = Σ_h W_o,h W_o,hᵀ over the group's query heads, o_proj's rows for head h, so it is the
   error the attention output adds to the residual stream. The S scaling gives every coordinate
   unit gain to the output, so a per-token quantizer (values) treats them alike; per-channel key
   quantization is invariant to it.
2. With `eigen:ERR` each layer gets the smallest K rank (V rank) whose relative error is ≤ ERR
   in every KV head (one rank per layer keeps the store rectangular): the paper's threshold rule
   with the threshold stated as the error it bounds. The paper's further loop, lowering the
   threshold layer by layer until the layer output error reaches a budget, is not run (it needs
   the decomposed layer's output for every candidate; ERR plays its role). `eigen:RANK` fixes the
   rank. With quantized coordinates the ERR-chosen ranks are rounded up to a multiple of
   runtime.kv.eigen.RANK_STEP (whole per-token value groups).
3. Differences from the paper's code, and why: bases per KV head (the reference code shares one
   key basis across a Llama layer's heads; per head is each head's optimum at the same bytes),
   fitted on post-RoPE keys because this cache projects after RoPE (runtime/kv/eigen.py), and
   the "aware" metric (the reference fits keys alone, or OPT's union of queries and keys).

The maps become the layers' KV state tensors `Uk` = E_k, `Uq` = D_k (n_kv_heads, D, r_k) and `Uv` =
E_v, `Uo` = D_v (n_kv_heads, D, r_v); no weight changes, so the no-cache forward is unchanged and
the verifier's KV drift measures what the low-rank cache costs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..compiler import ir
from ..compiler.passes import PassResult, register_pass
from ..compiler.spec import KVSpec
from ..runtime.kv import model_bytes_per_token
from ..runtime.kv.eigen import RANK_STEP, EigenParams
from ..runtime.kv.xquant import weight_of
from ..runtime.kvcache import KVBinding
from .assign_kv import CalibratedKVPass, KVShorthandConfig, attention_input_stats

log = logging.getLogger("mcomp.passes")


@dataclass(frozen=True)
class EigenConfig(KVShorthandConfig):
    KIND: ClassVar[str] = "eigen"
    kv: str = "eigen:0.1"          # the `--kv eigen:...` shorthand

    def params(self) -> EigenParams:
        return super().params()


def attention_moments(gm, ctx) -> tuple[list[dict[str, torch.Tensor]], int]:
    """(per layer {"k", "v": Σ_t x_tᵀx_t per KV head, "q": the same summed over each KV head's
    query heads}, each (Hkv, D, D) float64, over the post-RoPE queries and keys and the values
    the attention node receives; the number of tokens t)."""
    def init(ls):
        return {n: torch.zeros(ls.n_kv_heads, ls.head_dim, ls.head_dim, dtype=torch.float64)
                for n in "qkv"}

    def update(acc, *qkv):
        for name, x in zip("qkv", qkv):
            B, Hx, T, D = x.shape              # query head h belongs to KV head h // group
            H = acc[name].shape[0]
            x = x.double().view(B, H, Hx // H, T, D).transpose(0, 1).reshape(H, -1, D)
            acc[name] += x.transpose(1, 2) @ x
    return attention_input_stats(gm, ctx, init, update)


def output_metric(gm, layer: int, ls) -> torch.Tensor:
    """(Hkv, D, D) float64: Σ over each KV head's query heads h of W_o,h W_o,hᵀ, W_o,h (D × hidden)
    the rows of o_proj that read head h's attention output: the metric in which a value error
    reaches the residual stream."""
    w, _ = weight_of(KVBinding(gm, layer).module("o_proj"))        # (hidden, Hq·D)
    D, H = ls.head_dim, ls.n_kv_heads
    wo = w.double().T.reshape(ls.n_heads, D, -1)                  # (Hq, D, hidden)
    return (wo @ wo.transpose(1, 2)).view(H, ls.n_heads // H, D, D).sum(1)


def _sym_pow(c: torch.Tensor, power: float, damp: float) -> torch.Tensor:
    """c^power of symmetric PSD matrices (…, D, D), eigenvalues floored at damp·mean eigenvalue."""
    lam, u = torch.linalg.eigh(c)
    floor = damp * lam.mean(-1, keepdim=True).clamp(min=1e-300)
    return (u * lam.clamp(min=0).maximum(floor).pow(power)[..., None, :]) @ u.transpose(-1, -2)


def fitted_bases(c: torch.Tensor, g: torch.Tensor | None, damp: float = 1e-6):
    """The rank-ordered bases minimizing E‖x (I − E Dᵀ) g^{1/2}‖² over rank-r maps, for x with
    second moment c: with c^{1/2} g c^{1/2} = U S² Uᵀ,

        E = c^{-1/2} U S (encoder),   D = c^{1/2} U S⁻¹ (decoder),   error(r) = Σ_{i>r} S_i²,

    truncated to any r by taking the first r columns (the optimal rank-r approximation of the
    map x ↦ x g^{1/2} under x's distribution, Eckart–Young after whitening). The S scaling makes
    each coordinate reach the output with unit gain, so a per-token quantizer treats them alike.
    g None: the identity metric, E = D = U, the orthonormal PCA of x. Returns (S² descending
    (H, D), E (H, D, D), D (H, D, D))."""
    if g is None:
        lam, u = torch.linalg.eigh(c)
        return lam.flip(-1).clamp(min=0), u.flip(-1), u.flip(-1)
    ch, chi = _sym_pow(c, 0.5, damp), _sym_pow(c, -0.5, damp)
    s2, u = torch.linalg.eigh(ch @ g @ ch)
    s2, u = s2.flip(-1).clamp(min=0), u.flip(-1)
    s = s2.sqrt().clamp(min=1e-30 * float(s2.max().clamp(min=1e-300).sqrt()))[..., None, :]
    return s2, (chi @ u) * s, (ch @ u) / s


def relative_errors(s2: torch.Tensor) -> torch.Tensor:
    """(H, D + 1): entry [h, r] is head h's relative error of its rank-r map,
    sqrt(Σ_{i≥r} S_i² / Σ S_i²) (r = 0: 1, r = D: 0)."""
    tail = s2.flip(-1).cumsum(-1).flip(-1)                       # Σ_{i≥r} S_i² for r < D
    tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], -1)
    return (tail / tail[:, :1].clamp(min=1e-300)).sqrt()


def rank_for_error(s2: torch.Tensor, err: float, step: int = 1) -> int:
    """The smallest rank (a multiple of `step`, at most D) whose relative error is ≤ err in every
    head."""
    D = s2.shape[1]
    ok = (relative_errors(s2) <= err).all(0)                     # (D + 1,) monotone in r
    r = int(ok.float().argmax()) if bool(ok.any()) else D
    return min(D, max(step, math.ceil(max(r, 1) / step) * step))


@register_pass
class Eigen(CalibratedKVPass):
    name = "eigen"
    Config = EigenConfig
    version = 1

    def run(self, gm, ctx) -> PassResult:
        self.require_ctx(ctx)
        params = self.config.params()
        spec = ir.get_spec(gm)
        for ls in spec.layers:          # a fixed rank must fit every layer before calibrating
            params.check_layer(ls)
        before = model_bytes_per_token(spec)
        moments, n_tok = attention_moments(gm, ctx)
        step = RANK_STEP if params.bits else 1
        aware = params.basis == "aware"
        ranks, errors = [], []
        for i, (ls, m) in enumerate(zip(spec.layers, moments)):
            state, chosen, err = {}, [], []
            # keys in the metric of the queries (the logits), values in that of o_proj (the
            # attention output); "pca": both in the identity metric
            for enc, dec, c, g in (("Uk", "Uq", m["k"], m["q"] if aware else None),
                                   ("Uv", "Uo", m["v"], output_metric(gm, i, ls) if aware else None)):
                s2, E, Dm = fitted_bases(c, g)
                r = params.rank or rank_for_error(s2, params.err, step)
                state[enc] = E[..., :r].float().contiguous()
                state[dec] = Dm[..., :r].float().contiguous()
                chosen.append(r)
                err.append(round(float(relative_errors(s2)[:, r].max()), 4))
            lp = dataclasses.replace(params, k_rank=chosen[0], v_rank=chosen[1])
            ir.set_layer_kv(gm, i, KVSpec("eigen", lp), state)
            ranks.append(chosen)
            errors.append(err)
        after = model_bytes_per_token(ir.get_spec(gm))
        stats = {"kv": params.label(), "ranks_kv": ranks, "head_dim": [ls.head_dim for ls in spec.layers],
                 # the worst head's relative reconstruction error of its calibration K, V
                 "reconstruction_error_kv": errors, "calibration_tokens": n_tok,
                 "kv_bytes_per_token_before": before, "kv_bytes_per_token_after": after}
        log.info("eigen: ranks (K, V) per layer %s; worst-head error %s", ranks, errors)
        return PassResult(gm, stats)
