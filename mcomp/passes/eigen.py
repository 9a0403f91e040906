"""eigen: calibrate Eigen Attention's per-head K/V bases and give every layer an `eigen` cache.

Eigen Attention (arXiv 2408.05646, §3) stacks a head's calibration activations into a
representation matrix R (tokens × D), takes its SVD R = U Σ Vᵀ and keeps the r leading right
singular vectors as the head's basis, r chosen by an energy threshold on Σ; attention then runs
on the projections. Here, per layer, KV head and for K and V separately:

1. R is every post-RoPE key (every value) the attention node receives over the calibration
   windows. Its right singular vectors are the eigenvectors of the (uncentred) second-moment
   matrix C = RᵀR (D × D, accumulated in float64, so no activation matrix is ever held), with
   eigenvalues σ_i²: the basis is U_r = the top-r eigenvectors of C.
2. The projection's relative reconstruction error on the calibration activations is exactly

       ‖R − R U_r U_rᵀ‖_F / ‖R‖_F = sqrt(Σ_{i>r} σ_i² / Σ_i σ_i²),

   and with `eigen:ERR` each layer gets the smallest K rank (V rank) for which this is ≤ ERR in
   every KV head of the layer (one rank per layer keeps the store rectangular). This is the
   paper's threshold rule with the threshold stated as the error it bounds; the paper's extra
   loop, lowering the threshold layer by layer until the layer output error reaches a budget,
   is not run (it needs the decomposed layer's output for every candidate; ERR plays its role).
   `eigen:RANK` fixes the rank instead. With quantized coordinates the ERR-chosen ranks are
   rounded up to a multiple of runtime.kv.eigen.RANK_STEP (whole per-token value groups).
3. Basis choices that differ from the paper's code, and why: the key basis is per KV head (the
   reference code shares one key basis across a Llama layer's heads; per head is the optimal
   projection of each head at the same bytes) and is computed on post-RoPE keys, because this
   cache projects after RoPE (runtime/kv/eigen.py). Keys only, not the union of queries and
   keys the paper uses for OPT: the projection error of the logits q·(I − UUᵀ)·kᵀ is bounded by
   the keys' residual, and for GQA the query heads of a group would otherwise outweigh it.

The bases become the layers' KV state tensors `Uk` (n_kv_heads, D, r_k) and `Uv` (n_kv_heads, D,
r_v); no weight changes, so the no-cache forward is unchanged and the verifier's KV drift
measures what the low-rank cache costs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from ..compiler import ir
from ..compiler.calibrate import LayerwiseRunner
from ..compiler.passes import PassConfig, PassResult, register_pass
from ..compiler.spec import KVSpec
from ..errors import ConfigError
from ..runtime.kv import model_bytes_per_token, parse_kv
from ..runtime.kv.eigen import RANK_STEP, EigenParams
from .assign_kv import CalibratedKVPass

log = logging.getLogger("mcomp.passes")


@dataclass(frozen=True)
class EigenConfig(PassConfig):
    kv: str = "eigen:0.1"          # the `--kv eigen:...` shorthand
    version: int = 1

    def __post_init__(self):
        spec = parse_kv(self.kv).spec
        if spec.kind != "eigen":
            raise ConfigError(f"eigen pass: kv '{self.kv}' is not an eigen shorthand")

    def params(self) -> EigenParams:
        return parse_kv(self.kv).spec.params


def kv_moments(gm, ctx) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """(per layer (Σ_t k_tᵀk_t, Σ_t v_tᵀv_t) per KV head, each (Hkv, D, D) float64, over the
    post-RoPE keys and the values the attention node receives; the number of tokens t)."""
    spec = ir.get_spec(gm)
    runner = LayerwiseRunner(gm, ctx.calibration_batches())
    out = []
    for i, ls in enumerate(spec.layers):
        attn = next(n for n in ir.nodes_by_role(gm, "attn") if n.meta["mcomp"].layer == i)
        H, D = ls.n_kv_heads, ls.head_dim
        acc = {"k": torch.zeros(H, D, D, dtype=torch.float64),
               "v": torch.zeros(H, D, D, dtype=torch.float64), "n": 0}

        def collect(node, args, _out, attn=attn, acc=acc):
            if node is attn:        # args = (q (B, Hq, T, D), k (B, Hkv, T, D), v, h)
                for name, x in (("k", args[1]), ("v", args[2])):
                    x = x.double().transpose(0, 1).flatten(1, 2)          # (Hkv, B·T, D)
                    acc[name] += x.transpose(1, 2) @ x
                acc["n"] += args[1].shape[0] * args[1].shape[2]
        runner.advance(i, collect)
        out.append((acc["k"], acc["v"]))
    return out, acc["n"]


def principal_bases(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues (H, D) descending, eigenvectors (H, D, D), columns in that order) of each
    head's second-moment matrix."""
    evals, evecs = torch.linalg.eigh(moment)                     # ascending
    return evals.flip(-1).clamp(min=0), evecs.flip(-1)


def relative_errors(evals: torch.Tensor) -> torch.Tensor:
    """(H, D + 1): entry [h, r] is head h's relative Frobenius error of its rank-r projection,
    sqrt(Σ_{i≥r} λ_i / Σ λ_i) (r = 0: 1, r = D: 0)."""
    tail = evals.flip(-1).cumsum(-1).flip(-1)                    # Σ_{i≥r} λ_i for r < D
    tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], -1)
    return (tail / tail[:, :1].clamp(min=1e-300)).sqrt()


def rank_for_error(evals: torch.Tensor, err: float, step: int = 1) -> int:
    """The smallest rank (a multiple of `step`, at most D) whose projection error is ≤ err in
    every head."""
    D = evals.shape[1]
    ok = (relative_errors(evals) <= err).all(0)                  # (D + 1,) monotone in r
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
        moments, n_tok = kv_moments(gm, ctx)
        step = RANK_STEP if params.bits else 1
        ranks, errors = [], []
        for i, (ls, (ck, cv)) in enumerate(zip(spec.layers, moments)):
            state, chosen, err = {}, [], []
            for name, c in (("Uk", ck), ("Uv", cv)):
                evals, evecs = principal_bases(c)
                r = params.rank or rank_for_error(evals, params.err, step)
                state[name] = evecs[..., :r].float().contiguous()
                chosen.append(r)
                err.append(round(float(relative_errors(evals)[:, r].max()), 4))
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
