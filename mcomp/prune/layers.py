"""prune_layers: remove whole decoder blocks (the coarse stage of COMP, Lightweight and
Post-Training Structured Pruning for On-Device LLMs).

A block's importance is how much it changes the residual stream on calibration text:
1 − cos(x_in, x_out), averaged over tokens. The least important blocks go. With `iterative`
(default) one block is removed per round and the rest are re-scored on the pruned model, so
each score sees inputs that went through the blocks already removed; otherwise all blocks are
scored once on the unpruned model and the n lowest removed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compiler import ir
from ..compiler.calibrate import LayerwiseRunner
from ..compiler.passes import Pass, PassConfig, PassResult, register_pass
from ..errors import ConfigError
from . import shrink

log = logging.getLogger("mcomp.prune")


@dataclass(frozen=True)
class PruneLayersConfig(PassConfig):
    n_layers: int = 1                    # blocks to remove
    iterative: bool = True               # re-score after each removal
    exclude_layers: tuple[int, ...] = () # never removed (indices in the input model)

    def __post_init__(self):
        if self.n_layers < 1:
            raise ConfigError(f"prune_layers: n_layers={self.n_layers} must be ≥ 1")


def block_scores(gm, batches) -> list[float]:
    """1 − cos(x_in, x_out) per block, averaged over every calibration token."""
    runner = LayerwiseRunner(gm, batches)
    sums = [0.0] * runner.n_layers
    counts = [0] * runner.n_layers
    for i in range(runner.n_layers):
        first = next(n for n in runner.layers[i] if n.op == "call_module"
                     and n.meta["mcomp"].role == "attn_norm")
        last = runner.layers[i][-1]
        seen: dict = {}

        def fn(node, args, out, first=first, last=last, seen=seen):
            if node is first:
                seen["x"] = args[0]
            elif node is last:
                cos = F.cosine_similarity(seen.pop("x").double(), out.double(), dim=-1)  # (B, T)
                sums[i] += float((1 - cos).sum())
                counts[i] += cos.numel()

        runner.advance(i, fn)
    return [s / max(c, 1) for s, c in zip(sums, counts)]


@register_pass
class PruneLayers(Pass):
    name = "prune_layers"
    Config = PruneLayersConfig
    exact = False
    stage = "prune"

    def run(self, gm, ctx) -> PassResult:
        cfg: PruneLayersConfig = self.config
        spec = ir.get_spec(gm)
        L = spec.n_layers
        bad = [i for i in cfg.exclude_layers if not 0 <= i < L]
        if bad:
            raise ConfigError(f"prune_layers: exclude_layers {bad} out of range (model has {L} layers)")
        removable = L - len(set(cfg.exclude_layers))
        if cfg.n_layers >= L:
            raise ConfigError(f"prune_layers: cannot remove {cfg.n_layers} of {L} layers: "
                              "at least one must stay")
        if cfg.n_layers > removable:
            raise ConfigError(f"prune_layers: n_layers={cfg.n_layers} but only {removable} of {L} "
                              f"layers are not excluded")
        params0 = shrink.non_embedding_params(spec)
        origin = list(range(L))          # current index → index in the input model
        removed: list[dict] = []
        sd = {k: v.detach() for k, v in gm.state_dict().items()}
        rounds = cfg.n_layers if cfg.iterative else 1
        for _ in range(rounds):
            scores = block_scores(gm, ctx.calibration_batches())
            order = sorted((s, j) for j, s in enumerate(scores)
                           if origin[j] not in cfg.exclude_layers)
            k = 1 if cfg.iterative else cfg.n_layers
            drop = [j for _, j in order[:k]]
            for j in drop:
                removed.append({"layer": origin[j], "score": scores[j],
                                "reason": "1 − cos(x_in, x_out) lowest among remaining blocks",
                                "params": shrink.block_params(spec.layers[j], spec)["total"]})
            sd, spec = shrink.drop_layers(sd, spec, drop)
            origin = [o for j, o in enumerate(origin) if j not in drop]
            gm = ir.build(spec, sd)
            log.info("prune_layers: removed block(s) %s", [origin_r["layer"] for origin_r in removed[-k:]])
        params1 = shrink.non_embedding_params(spec)
        return PassResult(gm, {
            "removed_layers": sorted(r["layer"] for r in removed), "removed": removed,
            "kept_layers": origin, "iterative": cfg.iterative,
            "non_embedding_params_before": params0, "non_embedding_params_after": params1,
            "removed_ratio": 1 - params1 / params0})
