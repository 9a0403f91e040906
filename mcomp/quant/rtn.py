"""Weight-only round-to-nearest quantization pass (int8 / int4 / int3 / int2, grouped).

The baseline quantizer: per (row, group) min/max (asymmetric) or absmax (symmetric) scales,
optionally with a clipping search that shrinks each group's range to minimize its squared
reconstruction error (cheap, calibration-free, often worth ~10% of the error at 3–4 bits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..compiler.passes import Pass, PassResult, register_pass
from . import primitives as P
from .common import (Installer, PerLinearSchemes, WeightQuantConfig, bias_of, from_weight,
                     quantizable_linears, rtn_grid)
from .linear import QuantLinear
from .scheme import QUANTIZERS, WeightScheme


@dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    method: ClassVar[str] = "rtn"
    clip_search: bool = False
    # Integer zero point with 0 inside the range (GPTQ/AWQ convention). Measured on SmolLM2,
    # 4088 tokens, g128: int4 ppl 49.8 vs 61.6 with a float zero, int3 141 vs 451 (see
    # docs/benchmarks.md). A float zero only wins where it can reproduce a Q4_1 grid (g32).
    integer_zero: bool = True

    def embedding_grid(self, w: torch.Tensor, scheme: WeightScheme):
        return (clip_search(w, scheme, self.integer_zero) if self.clip_search
                else P.rtn_params(w, scheme, integer_zero=self.integer_zero))


def clip_search(w: torch.Tensor, scheme: WeightScheme, integer_zero: bool = True,
                grid: int = 20, min_ratio: float = 0.5):
    """Per (row, group) pick the range shrink factor with the least squared error."""
    return rtn_grid(w, scheme, integer_zero, None, grid, min_ratio)


def quantize_linear(lin: nn.Linear, scheme: WeightScheme, search: bool = False,
                    integer_zero: bool = True) -> QuantLinear:
    w = lin.weight.detach().float()
    s, z = (clip_search(w, scheme, integer_zero) if search
            else P.rtn_params(w, scheme, integer_zero=integer_zero))
    return from_weight(w, s, z, scheme, bias_of(lin))


@register_pass
class QuantizeWeightsRTN(PerLinearSchemes, Pass):
    name = "quantize_weights_rtn"
    Config = RTNConfig
    exact = False
    stage = "weights"

    def run(self, gm, ctx) -> PassResult:
        cfg: RTNConfig = self.config
        scheme = cfg.scheme()
        skipped: list = []
        install = Installer(gm)
        install.embedding(cfg)
        for node in quantizable_linears(gm, cfg, skipped):
            mod = gm.get_submodule(node.target)
            install(node, quantize_linear(mod, self.scheme_of(node), cfg.clip_search, cfg.integer_zero))
        return PassResult(gm, install.finish(scheme, skipped))


QUANTIZERS.register("rtn", QuantizeWeightsRTN)
