"""Importance metrics for structured pruning, and the calibration statistics they read.

A metric scores the *input channels* of a layer's two output projections: o_proj (one channel
per query-head dimension) and down_proj (one per MLP channel). Heads and KV groups are scored
from their channels (see `unit_scores`). Metrics register in IMPORTANCE; a new metric is a
subclass with a `name`, its default structure and bias-compensation policy, and
`channel_scores`.

    flap       fluctuation: Var_tokens[x_c] * ||W[:, c]||^2 (An et al., FLAP, AAAI 2024);
               standardized per layer and module so that one global threshold chooses an
               adaptive per-layer structure, or ranked per module (uniform), whichever gives
               the lower calibration loss; bias compensation on by default.
    flap-postnorm  ablation: the fluctuation after a post-projection norm (Gemma 3).
    wanda-sp   structured Wanda: sum_rows |W[:, c]| * ||x_c||_2, uniform per-layer ratio.
    magnitude  weight norms of everything a channel owns (o/down column + q or gate/up row),
               uniform per-layer ratio; needs no calibration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..registry import Registry

IMPORTANCE: Registry = Registry("importance metric")


@dataclass
class ChannelStats:
    """Running per-input-channel statistics of one linear's input over calibration tokens
    (float64 accumulators: means of ~1e5 tokens would lose digits in fp32)."""

    n: int = 0
    s: torch.Tensor | None = None    # (C,) sum
    ss: torch.Tensor | None = None   # (C,) sum of squares

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()   # (tokens, C)
        if self.s is None:
            self.s = torch.zeros(x.shape[1], dtype=torch.float64)
            self.ss = torch.zeros(x.shape[1], dtype=torch.float64)
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += x.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.s / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.ss / max(self.n, 1) - self.mean.pow(2)).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """||x_c||^2 summed over tokens."""
        return self.ss


@dataclass
class LayerStats:
    """Inputs of o_proj and down_proj of one layer, raw and divided per token by the RMS of the
    projection's output (`*_normed`: what a sandwich norm after the projection, as in Gemma 3,
    actually passes on to the residual stream; see Flap)."""

    o_proj: ChannelStats = field(default_factory=ChannelStats)
    down_proj: ChannelStats = field(default_factory=ChannelStats)
    o_proj_normed: ChannelStats = field(default_factory=ChannelStats)
    down_proj_normed: ChannelStats = field(default_factory=ChannelStats)


def stats_collector(store: dict[int, LayerStats]):
    """A LayerwiseRunner node callback that accumulates o_proj / down_proj input statistics."""

    def fn(node, args, out):
        if node.op != "call_module":
            return
        info = node.meta["mcomp"]
        if info.role in ("o_proj", "down_proj"):
            st = store.setdefault(info.layer, LayerStats())
            x = args[0]
            getattr(st, info.role).add(x)
            rms = out.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # (..., 1)
            getattr(st, info.role + "_normed").add(x.float() / rms)

    return fn


class ImportanceMetric:
    name: ClassVar[str] = ""
    calibrated: ClassVar[bool] = True          # needs LayerStats
    structure: ClassVar[str] = "uniform"       # default: "global" (adaptive), "uniform", or
                                               # "search" (the better of both on calibration loss)
    normalize: ClassVar[str] = "rank"          # "standardize" (FLAP) or "rank"
    bias_compensation: ClassVar[bool] = False  # default of the pass's bias_compensation

    def channel_scores(self, mods: dict[str, nn.Linear], stats: LayerStats | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(o_proj input channel scores (q_dim,), down_proj input channel scores (ffn,)), float64.
        Higher = more important."""
        raise NotImplementedError


def register_metric(cls):
    IMPORTANCE.register(cls.name, cls)
    return cls


def _w(mod: nn.Linear) -> torch.Tensor:
    return mod.weight.detach().double()


@register_metric
class Flap(ImportanceMetric):
    """Fluctuation of each channel's contribution to the block output (FLAP's metric):
    Var_t[x_tc] · ||W[:, c]||²."""

    name = "flap"
    structure = "search"
    normalize = "standardize"
    bias_compensation = True
    post_norm_aware: ClassVar[bool] = False

    def channel_scores(self, mods, stats):
        return (self._fluctuation(mods, stats, "o_proj", "post_attn_norm"),
                self._fluctuation(mods, stats, "down_proj", "post_mlp_norm"))

    def _fluctuation(self, mods, stats, proj: str, post_norm: str) -> torch.Tensor:
        w = _w(mods[proj])                                          # (out, C)
        if self.post_norm_aware and post_norm in mods:
            w = w * mods[post_norm].weight.detach().double()[:, None]
            return getattr(stats, proj + "_normed").var * w.pow(2).sum(0)
        return getattr(stats, proj).var * w.pow(2).sum(0)


@register_metric
class FlapPostNorm(Flap):
    """FLAP measured after a post-projection norm (an ablation, not the default).

    With Gemma's sandwich norms (y = g ⊙ Wx / rms(Wx)) the residual stream receives
    g ⊙ W[:, c] · x_tc / rms_t, so the fluctuation that reaches it is
    Var_t[x_tc / rms_t] · ||g ⊙ W[:, c]||². Plausible, but measured worse on Gemma 3 270M at
    30% (perplexity 123.6 vs plain FLAP's 115.3 with the uniform structure, 245.7 vs 163.2 with
    the global one; docs/benchmarks.md), so plain FLAP stays the default. Without a post norm
    the two coincide."""

    name = "flap-postnorm"
    post_norm_aware = True


@register_metric
class WandaSP(ImportanceMetric):
    name = "wanda-sp"

    def channel_scores(self, mods, stats):
        a = (_w(mods["o_proj"]).abs() * stats.o_proj.sq_norm.sqrt()).sum(0)
        m = (_w(mods["down_proj"]).abs() * stats.down_proj.sq_norm.sqrt()).sum(0)
        return a, m


@register_metric
class Magnitude(ImportanceMetric):
    name = "magnitude"
    calibrated = False

    def channel_scores(self, mods, stats):
        a = _w(mods["o_proj"]).pow(2).sum(0) + _w(mods["q_proj"]).pow(2).sum(1)
        m = _w(mods["down_proj"]).pow(2).sum(0) + _w(mods["up_proj"]).pow(2).sum(1)
        if "gate_proj" in mods:
            m = m + _w(mods["gate_proj"]).pow(2).sum(1)
        return a.sqrt(), m.sqrt()


# ----------------------------------------------------------------------------- units

def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one layer's module; a constant vector maps to zeros."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def quantiles(x: torch.Tensor) -> torch.Tensor:
    """Rank of each element within x mapped to (0, 1): the same fraction of every layer's
    units falls under any threshold (uniform per-layer ratio). Ties keep index order."""
    order = torch.argsort(x, stable=True)
    q = torch.empty_like(x, dtype=torch.float64)
    q[order] = (torch.arange(x.numel(), dtype=torch.float64) + 0.5) / x.numel()
    return q


@dataclass
class UnitScores:
    """One layer's scores: per query head (n_heads,), per KV group (n_kv,), per MLP channel
    (ffn,), all after the metric's normalization; higher = keep."""

    q_heads: torch.Tensor
    kv_groups: torch.Tensor
    channels: torch.Tensor


def unit_scores(metric: ImportanceMetric, attn: torch.Tensor, mlp: torch.Tensor,
                n_heads: int, n_kv_heads: int, normalize: str | None = None) -> UnitScores:
    """Channel scores → head / KV-group / channel scores. FLAP standardizes the channel scores
    of each module and averages them over a unit's channels (a head of any head_dim, a KV group
    of any size, compare on one scale); rank normalization ranks units within the module."""
    normalize = normalize or metric.normalize
    if normalize == "standardize":
        attn, mlp = standardize(attn), standardize(mlp)
    per_head = attn.reshape(n_heads, -1).mean(1)                              # (n_heads,)
    per_group = per_head.reshape(n_kv_heads, -1).mean(1)                      # (n_kv,)
    if normalize == "rank":
        return UnitScores(quantiles(per_head), quantiles(per_group), quantiles(mlp))
    return UnitScores(per_head, per_group, mlp)


def heads_cost_in_channels(n_heads_in_group: int, head_dim: int, gated: bool) -> float:
    """Parameters of one KV group (its q heads, k/v head, o columns) per MLP channel's: the
    weight FLAP gives a head when it sets one global threshold (512/3 for a LLaMA MHA head)."""
    return (2 * n_heads_in_group + 2) * head_dim / (3 if gated else 2)


__all__ = ["IMPORTANCE", "ImportanceMetric", "ChannelStats", "LayerStats", "stats_collector",
           "unit_scores", "UnitScores", "standardize", "quantiles", "register_metric",
           "heads_cost_in_channels"]
