"""prune_structured: remove attention heads / KV groups and MLP channels, physically.

1. Score (phase 1). One block-by-block walk over the calibration batches gathers the input
   statistics of every o_proj / down_proj; the metric turns them into per-channel scores,
   then into unit scores (query heads, KV groups, MLP channels; see importance.unit_scores).
2. Choose the structure. One global threshold on the normalized unit scores decides, per
   layer, how many KV groups (or query heads per group), and MLP channels stay, subject to
   the keep-minimums and excluded layers. The threshold is searched so that the remaining
   non-embedding parameters come closest to the target; each unit is therefore weighted by
   its real parameter count (a KV group of g heads costs (2g+2)·head_dim·hidden, an MLP
   channel 3·hidden when gated) — FLAP's head weighting, generalized to GQA and any head_dim.
   FLAP standardizes scores per layer and module (adaptive structure); wanda-sp and magnitude
   rank units within each module, so every layer loses the same share (uniform structure).
   FLAP's default, `search`, builds both and keeps the one with the lower calibration loss.
3. Shrink (phase 2). A second block-by-block walk: for layer i, statistics are gathered on
   inputs that went through the already-pruned layers 0..i-1, the layer's units are re-ranked
   on them, the lowest go (with FLAP bias compensation: the mean contribution of the removed
   channels becomes an o_proj / down_proj bias), the layer's linears are replaced by sliced
   ones, and the walk advances through the pruned layer.
Finally the IR is rebuilt from the new spec and sliced weights (`ir.build`).

Head granularity: `kv_group` removes whole KV groups (a k/v head with every query head that
reads it); `q_head` keeps every KV group and removes the same number of query heads from each
(the layer stays a valid GQA layer). `auto`: kv_group when a layer has ≥ 2 KV groups, else
q_head (Gemma 3 270M has one KV head per layer).
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..compiler import ir
from ..compiler.calibrate import LayerwiseRunner
from ..compiler.passes import Pass, PassConfig, PassResult, register_pass
from ..compiler.spec import ModelSpec
from ..errors import ConfigError, PassError
from . import shrink
from .importance import IMPORTANCE, ImportanceMetric, LayerStats, UnitScores, stats_collector, unit_scores

log = logging.getLogger("mcomp.prune")

STRUCTURES = ("auto", "global", "uniform", "search")
SEARCHED = ("global", "uniform")   # what `search` chooses between
HEAD_UNITS = ("auto", "kv_group", "q_head")
TARGETS = ("heads", "channels")


@dataclass(frozen=True)
class PruneStructuredConfig(PassConfig):
    method: str = "flap"                     # key in prune.importance.IMPORTANCE
    ratio: float = 0.2                       # share of non-embedding parameters to remove
    target_params: int = 0                   # >0: non-embedding parameters to keep (overrides ratio)
    target_bytes: int = 0                    # >0: total weight bytes to end at, as stored when the
                                             #     pass runs (fp32 before quantization; overrides ratio)
    structure: str = "auto"                  # auto (the metric's) | global (adaptive) | uniform
                                             # | search (both, keep the lower calibration loss)
    head_unit: str = "auto"                  # auto | kv_group | q_head
    targets: tuple[str, ...] = TARGETS       # what may be pruned: heads, channels
    min_heads_per_layer: int = 1             # query heads kept per layer, at least
    min_channels_per_layer: int = 1          # MLP channels kept per layer, at least
    min_head_fraction: float = 0.0           # ... and at least this share of the layer's
    min_channel_fraction: float = 0.0
    channel_multiple: int = 1                # round kept MLP channels up to a multiple
    exclude_layers: tuple[int, ...] = ()     # layers left untouched
    bias_compensation: bool | str = "auto"   # auto: the metric's default (on for flap)
    recalibrate: bool = True                 # phase 2 re-ranks on already-pruned inputs

    def __post_init__(self):
        where = "prune_structured"
        IMPORTANCE.get(self.method)  # unknown method: ConfigError listing the valid ones
        if self.target_params < 0 or self.target_bytes < 0:
            raise ConfigError(f"{where}: target_params / target_bytes must be ≥ 0")
        if self.target_params and self.target_bytes:
            raise ConfigError(f"{where}: give target_params or target_bytes, not both")
        if not self.absolute_target and not (0.0 < self.ratio < 1.0):
            raise ConfigError(f"{where}: ratio={self.ratio} must lie strictly between 0 and 1 "
                              "(the share of non-embedding parameters to remove)")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"{where}: structure '{self.structure}'; choose one of {', '.join(STRUCTURES)}")
        if self.head_unit not in HEAD_UNITS:
            raise ConfigError(f"{where}: head_unit '{self.head_unit}'; choose one of {', '.join(HEAD_UNITS)}")
        bad = set(self.targets) - set(TARGETS)
        if bad or not self.targets:
            raise ConfigError(f"{where}: targets {list(self.targets)}; choose from {', '.join(TARGETS)}")
        if self.min_heads_per_layer < 1 or self.min_channels_per_layer < 1:
            raise ConfigError(f"{where}: min_heads_per_layer and min_channels_per_layer must be ≥ 1 "
                              "(a layer cannot lose all of its attention or MLP)")
        for name in ("min_head_fraction", "min_channel_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{where}: {name}={v} must lie in [0, 1]")
        if self.channel_multiple < 1:
            raise ConfigError(f"{where}: channel_multiple={self.channel_multiple} must be ≥ 1")
        if self.bias_compensation not in (True, False, "auto"):
            raise ConfigError(f"{where}: bias_compensation must be true, false or \"auto\"")
        if not self.absolute_target:
            keep = min([self.min_head_fraction] * ("heads" in self.targets)
                       + [self.min_channel_fraction] * ("channels" in self.targets))
            if self.ratio >= 1.0 - keep:
                raise ConfigError(
                    f"{where}: ratio={self.ratio} contradicts the keep-minimums: keeping "
                    f"≥{keep:.0%} of every pruned module leaves at most {1 - keep:.0%} removable")

    @property
    def absolute_target(self) -> bool:
        return bool(self.target_params or self.target_bytes)

    def metric(self) -> ImportanceMetric:
        return IMPORTANCE.get(self.method)()

    def resolved_structure(self) -> str:
        return self.metric().structure if self.structure == "auto" else self.structure

    def resolved_bias(self) -> bool:
        return (self.metric().bias_compensation if self.bias_compensation == "auto"
                else bool(self.bias_compensation))


@dataclass
class LayerPlan:
    kv_keep: int          # KV groups kept
    q_per_group: int      # query heads kept in every kept group
    ch_keep: int          # MLP channels kept
    head_unit: str


def _layer_modules(gm, i: int) -> dict[str, nn.Module]:
    """Layer i's linears, and its post-projection (sandwich) norms when it has them."""
    out = {}
    for name in shrink.ATTN_LINEARS + shrink.MLP_LINEARS + ("post_attn_norm", "post_mlp_norm"):
        try:
            out[name] = gm.get_submodule(f"layers.{i}.{name}")
        except AttributeError:
            pass
    return out


def _install_layer(gm, i: int, sd: dict[str, torch.Tensor], saved: dict) -> None:
    """Replace layer i's linears with plain nn.Linears holding the (sliced) tensors of `sd`;
    the replaced modules go into `saved` (target → module) so the caller can restore them."""
    for name in shrink.ATTN_LINEARS + shrink.MLP_LINEARS:
        w = sd.get(f"layers.{i}.{name}.weight")
        if w is None:
            continue
        b = sd.get(f"layers.{i}.{name}.bias")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        lin.eval()
        target = f"layers.{i}.{name}"
        saved.setdefault(target, gm.get_submodule(target))
        ir.replace_module(gm, target, lin)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (ties: lower index first), in ascending index order."""
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


class Planner:
    """Maps a threshold on unit scores to per-layer structure and parameter counts."""

    def __init__(self, spec: ModelSpec, scores: dict[int, UnitScores], cfg: PruneStructuredConfig):
        self.spec, self.scores, self.cfg = spec, scores, cfg
        self.prunable = [i for i in range(spec.n_layers) if i not in set(cfg.exclude_layers)]
        self.units: dict[int, str] = {}
        for i in self.prunable:
            ls = spec.layers[i]
            u = cfg.head_unit
            if u == "auto":
                u = "kv_group" if ls.n_kv_heads > 1 else "q_head"
            self.units[i] = u

    def plan(self, t: float) -> dict[int, LayerPlan]:
        cfg, out = self.cfg, {}
        for i, ls in enumerate(self.spec.layers):
            g = ls.n_heads // ls.n_kv_heads
            unit = self.units.get(i, "kv_group")
            p = LayerPlan(ls.n_kv_heads, g, ls.ffn_dim, unit)
            if i in self.units:
                s = self.scores[i]
                if "heads" in cfg.targets:
                    min_q = min(ls.n_heads, max(cfg.min_heads_per_layer,
                                                math.ceil(cfg.min_head_fraction * ls.n_heads - 1e-9)))
                    if unit == "kv_group":
                        n = int((s.kv_groups >= t).sum())
                        p.kv_keep = min(ls.n_kv_heads, max(n, math.ceil(min_q / g)))
                    else:
                        n = int((s.q_heads >= t).sum())
                        p.q_per_group = min(g, max(round(n / ls.n_kv_heads),
                                                   math.ceil(min_q / ls.n_kv_heads)))
                if "channels" in cfg.targets:
                    min_c = min(ls.ffn_dim, max(cfg.min_channels_per_layer,
                                                math.ceil(cfg.min_channel_fraction * ls.ffn_dim - 1e-9)))
                    k = max(int((s.channels >= t).sum()), min_c)
                    m = cfg.channel_multiple
                    p.ch_keep = min(ls.ffn_dim, math.ceil(k / m) * m)
            out[i] = p
        return out

    def params(self, plan: dict[int, LayerPlan]) -> int:
        return shrink.non_embedding_params(self.apply_spec(plan))

    def apply_spec(self, plan: dict[int, LayerPlan]) -> ModelSpec:
        spec = self.spec
        for i, p in plan.items():
            spec = spec.with_layer(i, n_heads=p.kv_keep * p.q_per_group, n_kv_heads=p.kv_keep,
                                   ffn_dim=p.ch_keep)
        return spec

    def candidates(self) -> list[float]:
        vals: set[float] = set()
        for i in self.prunable:
            s = self.scores[i]
            if "heads" in self.cfg.targets:
                t = s.kv_groups if self.units[i] == "kv_group" else s.q_heads
                vals.update(float(v) for v in t)
            if "channels" in self.cfg.targets:
                vals.update(float(v) for v in s.channels)
        return sorted(vals) + [math.inf]

    def search(self, target: int) -> tuple[float, dict[int, LayerPlan], int]:
        """Threshold whose plan's non-embedding parameter count is closest to `target`."""
        cands = self.candidates()
        counts: dict[int, int] = {}

        def count(k: int) -> int:
            if k not in counts:
                counts[k] = self.params(self.plan(cands[k]))
            return counts[k]

        if count(len(cands) - 1) > target:
            floor = count(len(cands) - 1)
            total = shrink.non_embedding_params(self.spec)
            raise ConfigError(
                f"prune_structured: cannot keep only {target:,} of {total:,} non-embedding "
                f"parameters: the keep-minimums, targets and excluded layers allow removing at "
                f"most {1 - floor / total:.1%} (down to {floor:,})")
        # params(k) is non-increasing in k: first k with params ≤ target
        k = bisect.bisect_left(range(len(cands)), True, key=lambda j: count(j) <= target)
        if k > 0 and abs(count(k - 1) - target) < abs(count(k) - target):
            k -= 1
        return cands[k], self.plan(cands[k]), count(k)


def calibration_loss(gm, ctx) -> float:
    """Mean next-token NLL of `gm` over the calibration windows (one window per forward: a 262k
    vocabulary makes a batch of logits large)."""
    from ..runtime.metrics import token_nll
    total, n = 0.0, 0
    with torch.inference_mode():
        for batch in ctx.calibration_batches(batch_size=1):
            logits = gm(batch, ctx.positions(batch))                  # (1, T, V)
            nll = token_nll(logits[0, :-1], batch[0, 1:])
            total, n = total + float(nll.sum()), n + nll.numel()
    return total / n


@register_pass
class PruneStructured(Pass):
    name = "prune_structured"
    Config = PruneStructuredConfig
    exact = False
    stage = "prune"

    def check(self, gm) -> None:
        spec = ir.get_spec(gm)
        for i, ls in enumerate(spec.layers):
            if ls.fused_qkv or ls.fused_gate_up:
                raise PassError(f"layer {i} has fused projections; run pruning before fuse_* passes",
                                pass_name=self.name)
        for node in ir.nodes_by_role(gm, *ir.DECODER_LINEAR_ROLES):
            if type(gm.get_submodule(node.target)) is not nn.Linear:
                raise PassError("pruning needs float nn.Linear projections; run it before "
                                "quantization", pass_name=self.name, node=node.name)
        bad = [i for i in self.config.exclude_layers if not 0 <= i < spec.n_layers]
        if bad:
            raise ConfigError(f"prune_structured: exclude_layers {bad} out of range "
                              f"(model has {spec.n_layers} layers)")

    @staticmethod
    def _params_for_bytes(gm, total0: int, target_bytes: int) -> int:
        """Non-embedding parameters to keep so the model's weights take `target_bytes`: the
        embedding (and anything else outside the decoder) is a fixed cost pruning cannot cut."""
        from ..units import format_bytes
        bytes0 = ir.weight_bytes(gm)
        elem = gm.get_submodule("layers.0.o_proj").weight.element_size()
        fixed = bytes0 - total0 * elem
        if target_bytes <= fixed:
            raise ConfigError(
                f"prune_structured: target_bytes {format_bytes(target_bytes)} is not reachable: the "
                f"embedding and other unprunable weights alone take {format_bytes(fixed)} "
                f"(the model has {format_bytes(bytes0)})")
        return (target_bytes - fixed) // elem

    # ------------------------------------------------------------------ phases
    def _scores(self, gm, spec, metric, stats: dict[int, LayerStats], normalize) -> dict[int, UnitScores]:
        out = {}
        for i, ls in enumerate(spec.layers):
            a, m = metric.channel_scores(_layer_modules(gm, i), stats.get(i))
            out[i] = unit_scores(metric, a, m, ls.n_heads, ls.n_kv_heads, normalize)
        return out

    def run(self, gm, ctx) -> PassResult:
        cfg: PruneStructuredConfig = self.config
        spec0 = ir.get_spec(gm)
        metric = cfg.metric()
        structure = cfg.resolved_structure()
        bias = cfg.resolved_bias()
        need_stats = metric.calibrated or bias
        total0 = shrink.non_embedding_params(spec0)
        target = cfg.target_params or round(total0 * (1.0 - cfg.ratio))
        if cfg.target_bytes:
            target = self._params_for_bytes(gm, total0, cfg.target_bytes)
        if target >= total0:
            raise ConfigError(f"prune_structured: target_params={target:,} is not below the model's "
                              f"{total0:,} non-embedding parameters")
        if structure == "search" and ctx is None:
            raise ConfigError("prune_structured: structure 'search' compares calibration losses; "
                              "it needs calibration text")

        # phase 1: scores on the unpruned model, shared by every structure tried
        stats1: dict[int, LayerStats] = {}
        if need_stats:
            runner = LayerwiseRunner(gm, ctx.calibration_batches())
            collect = stats_collector(stats1)
            for i in range(runner.n_layers):
                runner.advance(i, collect)
            del runner

        # phase 2 per structure: one global threshold → per-layer plan, then the shrink walk.
        # `search` (FLAP's default) builds both the adaptive and the uniform model and keeps the
        # one with the lower loss on the calibration text: which allocation wins depends on the
        # model (adaptive for SmolLM2; uniform for Gemma 3, whose post-projection norms make
        # standardized fluctuations poor guides across layers), and the loss is what decides.
        tried = {}
        for st in (SEARCHED if structure == "search" else (structure,)):
            tried[st] = self._prune(gm, ctx, spec0, metric, st, bias, need_stats, stats1, target)
            if structure == "search":
                tried[st]["calibration_loss"] = calibration_loss(tried[st]["gm"], ctx)
                log.info("prune_structured: %s structure → calibration loss %.4f",
                         st, tried[st]["calibration_loss"])
        chosen = min(tried, key=lambda k: tried[k].get("calibration_loss", 0.0))
        best = tried[chosen]
        new, spec = best["gm"], best["spec"]
        total1 = shrink.non_embedding_params(spec)
        stats = {
            "method": cfg.method, "structure": chosen, "normalize": best["normalize"],
            "bias_compensation": bias, "threshold": best["threshold"],
            "non_embedding_params_before": total0, "non_embedding_params_after": total1,
            "target_params": target, "target_bytes": cfg.target_bytes,
            "removed_ratio": 1 - total1 / total0, "weight_bytes_after": ir.weight_bytes(new),
            "embedding_params": shrink.embedding_params(spec0),
            "layers": best["layers"],
        }
        if structure == "search":
            stats["structure_search"] = {k: round(v["calibration_loss"], 5) for k, v in tried.items()}
        log.info("prune_structured %s: non-embedding params %d → %d (%.1f%% removed)",
                 cfg.method, total0, total1, 100 * (1 - total1 / total0))
        return PassResult(new, stats)

    def _prune(self, gm, ctx, spec0, metric, structure, bias, need_stats, stats1, target) -> dict:
        """Plan with `structure` and shrink; the input IR is left as it was."""
        normalize = {"global": metric.normalize if metric.normalize != "rank" else "standardize",
                     "uniform": "rank"}[structure]
        scores = self._scores(gm, spec0, metric, stats1, normalize)
        threshold, plan, _ = Planner(spec0, scores, self.config).search(target)
        # layers are shrunk in place (later layers must see them); the input IR is restored after
        saved: dict = {}
        try:
            new, spec, layers = self._shrink(gm, ctx, spec0, metric, normalize, bias,
                                             need_stats, stats1, plan, saved)
        finally:
            for name, mod in saved.items():
                ir.replace_module(gm, name, mod)
        return {"gm": new, "spec": spec, "layers": layers, "normalize": normalize,
                "threshold": threshold}

    def _shrink(self, gm, ctx, spec0, metric, normalize, bias, need_stats, stats1, plan, saved):
        cfg: PruneStructuredConfig = self.config
        spec = spec0
        runner = (LayerwiseRunner(gm, ctx.calibration_batches())
                  if need_stats and cfg.recalibrate else None)
        layers_report = []
        for i, ls in enumerate(spec0.layers):
            p = plan[i]
            g = ls.n_heads // ls.n_kv_heads
            changes = (p.kv_keep != ls.n_kv_heads or p.q_per_group != g or p.ch_keep != ls.ffn_dim)
            st = stats1.get(i)
            if changes and runner is not None:
                fresh: dict[int, LayerStats] = {}
                runner.observe(i, stats_collector(fresh))
                st = fresh[i]
            entry = {"layer": i, "params_before": shrink.block_params(ls, spec0)["total"]}
            if changes:
                a, m = metric.channel_scores(_layer_modules(gm, i), st)
                s = unit_scores(metric, a, m, ls.n_heads, ls.n_kv_heads, normalize)
                sd = {k: v.detach() for k, v in gm.state_dict().items() if k.startswith(f"layers.{i}.")}
                groups = _top(s.kv_groups, p.kv_keep) if p.kv_keep != ls.n_kv_heads else list(range(ls.n_kv_heads))
                q_in = None
                if p.q_per_group != g:
                    q_in = [[r for r in _top(s.q_heads[j * g:(j + 1) * g], p.q_per_group)] for j in groups]
                kept_q = [j * g + r for j in groups for r in (range(g) if q_in is None else q_in[groups.index(j)])]
                channels = (_top(s.channels, p.ch_keep) if p.ch_keep != ls.ffn_dim
                            else list(range(ls.ffn_dim)))
                removed_q = sorted(set(range(ls.n_heads)) - set(kept_q))
                removed_c = sorted(set(range(ls.ffn_dim)) - set(channels))
                D = ls.head_dim
                if bias and removed_q:
                    sd, spec = shrink.compensate_bias(
                        sd, spec, i, "o_proj", [h * D + d for h in removed_q for d in range(D)],
                        st.o_proj.mean)
                if bias and removed_c:
                    sd, spec = shrink.compensate_bias(sd, spec, i, "down_proj", removed_c, st.down_proj.mean)
                if removed_q:
                    sd, spec = shrink.keep_heads(sd, spec, i, groups, q_in)
                if removed_c:
                    sd, spec = shrink.keep_channels(sd, spec, i, channels)
                _install_layer(gm, i, sd, saved)
                entry.update({
                    "heads": f"{ls.n_heads}→{spec.layers[i].n_heads}",
                    "kv_heads": f"{ls.n_kv_heads}→{spec.layers[i].n_kv_heads}",
                    "ffn": f"{ls.ffn_dim}→{spec.layers[i].ffn_dim}",
                    "head_unit": p.head_unit,
                    "removed_kv_groups": sorted(set(range(ls.n_kv_heads)) - set(groups)),
                    "removed_q_heads": removed_q,
                    "removed_channels": len(removed_c),
                    "bias_compensated": bool(bias and (removed_q or removed_c)),
                })
            else:
                entry["reason"] = ("excluded" if i in cfg.exclude_layers
                                   else "every unit scored above the threshold")
            entry["params_after"] = shrink.block_params(spec.layers[i], spec)["total"]
            layers_report.append(entry)
            if runner is not None and i < spec0.n_layers - 1:
                runner.advance(i)
        del runner
        new = ir.build(spec, {k: v.detach() for k, v in gm.state_dict().items()})
        return new, spec, layers_report
