"""think: choose each layer's kept key channels (ThinK) and give every layer a `think` cache.

ThinK (arXiv 2407.21018, §3.2) prunes the key channels whose removal changes the attention logits
Q Kᵀ least. Removing channel c subtracts the rank-1 term Q[:, c] K[:, c]ᵀ, whose magnitude is

    score_c = ‖Q[:, c] K[:, c]ᵀ‖_F = ‖Q[:, c]‖₂ · ‖K[:, c]‖₂

(the norms over tokens), and ThinK keeps the channels of largest score per head. Here Q and K
are the post-RoPE queries and keys the attention node receives, over all calibration windows
(ThinK scores on an observation window of the live prompt; this pass fixes the channels once,
offline, so they are part of the artifact and the cache layout is static).

- GQA: a KV head's channel serves every query head of its group, so its score is the sum over
  those query heads h of ‖Q_h[:, c]‖ · ‖K[:, c]‖.
- RoPE pairs: half-split RoPE rotates channel j with j + D/2, so the two are kept or dropped as a
  unit (runtime/kv/think.py). A pair's score is sqrt(score_j² + score_{j+D/2}²), the Frobenius
  norm of the two logit terms the pair removes taken together, ‖[Q_j K_jᵀ, Q_{j+D/2} K_{j+D/2}ᵀ]‖_F:
  ThinK's per-channel measure extended to a unit of two channels (the sum of the two scores
  would rank pairs much the same; the norm keeps the paper's Frobenius measure).
- Without RoPE (layer.rope is None) channels are scored and chosen independently.

Per KV head round(ratio·D) channels are removed (an even count with RoPE, whole pairs; the
effective fraction is in the stats) and the top channels (top pairs) are kept, sorted ascending,
as the layer's state tensor `keep` (n_kv_heads, D_kept) int64. No weight changes: the no-cache
forward still uses every channel, and the verifier's KV drift measures what the pruned cache costs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..compiler import ir
from ..compiler.passes import PassResult, register_pass
from ..compiler.spec import KVSpec
from ..runtime.kv import model_bytes_per_token
from ..runtime.kv.think import ThinKParams
from .assign_kv import CalibratedKVPass, KVShorthandConfig, attention_input_stats

log = logging.getLogger("mcomp.passes")


@dataclass(frozen=True)
class ThinKConfig(KVShorthandConfig):
    KIND: ClassVar[str] = "think"
    kv: str = "think:0.5"          # the `--kv think:...` shorthand

    def params(self) -> ThinKParams:
        return super().params()


def qk_energies(gm, ctx) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """(per layer (Σ_t q², (Hq, D); Σ_t k², (Hkv, D)) in float64, the number of tokens t): the
    squared channel norms of the post-RoPE queries and keys the attention node receives, over
    the calibration windows."""
    def init(ls):
        return (torch.zeros(ls.n_heads, ls.head_dim, dtype=torch.float64),
                torch.zeros(ls.n_kv_heads, ls.head_dim, dtype=torch.float64))

    def update(acc, q, k, v):
        acc[0].add_(q.double().pow(2).sum((0, 2)))
        acc[1].add_(k.double().pow(2).sum((0, 2)))
    return attention_input_stats(gm, ctx, init, update)


def channel_scores(q2: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """ThinK's score per (KV head, channel), (Hkv, D): Σ over the group's query heads h of
    ‖Q_h[:, c]‖ · ‖K[:, c]‖, from the squared norms q2 (Hq, D) and k2 (Hkv, D)."""
    Hq, D = q2.shape
    Hkv = k2.shape[0]
    qn = q2.sqrt().view(Hkv, Hq // Hkv, D)        # query head h belongs to KV head h // group
    return (qn * k2.sqrt()[:, None]).sum(1)


def select_channels(scores: torch.Tensor, n_removed: int, paired: bool) -> torch.Tensor:
    """(Hkv, D) scores → kept channel indices (Hkv, D − n_removed) int64, ascending per row.
    `paired`: channels j and j + D/2 (one RoPE pair) are scored together and kept together."""
    Hkv, D = scores.shape
    if paired:
        half = D // 2
        unit = (scores[:, :half].pow(2) + scores[:, half:].pow(2)).sqrt()     # (Hkv, D/2)
        n_keep = half - n_removed // 2
    else:
        unit, n_keep = scores, D - n_removed
    # stable sort: ties keep the lower index, so the choice is deterministic
    top = torch.sort(unit, dim=1, descending=True, stable=True).indices[:, :n_keep]
    if paired:
        top = torch.cat([top, top + D // 2], dim=1)
    return top.sort(dim=1).values.to(torch.int64).contiguous()


@register_pass
class ThinK(CalibratedKVPass):
    name = "think"
    Config = ThinKConfig
    version = 1

    def run(self, gm, ctx) -> PassResult:
        self.require_ctx(ctx)
        params = self.config.params()
        spec = ir.get_spec(gm)
        for ls in spec.layers:          # every layer must fit the ratio before calibrating
            params.check_layer(ls)
        before = model_bytes_per_token(spec)
        energies, n_tok = qk_energies(gm, ctx)
        kept, kept_score = [], []
        for i, (ls, (q2, k2)) in enumerate(zip(spec.layers, energies)):
            scores = channel_scores(q2, k2)
            keep = select_channels(scores, params.removed(ls), ls.rope is not None)
            ir.set_layer_kv(gm, i, KVSpec("think", params), {"keep": keep})
            kept.append(keep.shape[1])
            # share of the ThinK score mass the kept channels carry (1.0 = nothing lost)
            kept_score.append(round(float(scores.gather(1, keep).sum() / scores.sum()), 4))
        after = model_bytes_per_token(ir.get_spec(gm))
        stats = {"kv": params.label(), "key_channels_kept": kept,
                 "head_dim": [ls.head_dim for ls in spec.layers], "score_kept": kept_score,
                 # the ratio rounded to whole channels (pairs): think:0.4 removes 26/64 = 0.406
                 "removed_fraction": sorted({round(1 - k / ls.head_dim, 4)
                                             for k, ls in zip(kept, spec.layers)}),
                 "calibration_tokens": n_tok,
                 "kv_bytes_per_token_before": before, "kv_bytes_per_token_after": after}
        log.info("think: kept %s key channels per head; score kept %s", kept, kept_score)
        return PassResult(gm, stats)
