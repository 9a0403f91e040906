"""GPTQ (Frantar et al. 2022): second-order weight quantization from calibration inputs.

For a linear y = x·Wᵀ with calibration inputs X (n, K), the layer-wise objective is
‖XWᵀ − XŴᵀ‖², whose Hessian in each row of W is H = 2XᵀX/n (accumulated in fp32 over the
calibration batches, block by block through `LayerwiseRunner`; linears reading the same input
— q/k/v, gate/up, or the fused qkv_proj / gate_up_proj — share one H). Then, as in the
reference implementation:

- dead columns (H_jj = 0: an input channel that is always 0) get H_jj = 1 and W[:, j] = 0;
- dampening: H += percdamp · mean(diag H) · I (retried ×10 up to 4 times if Cholesky fails);
- optional act_order: columns processed by decreasing H_jj;
- U = chol(H⁻¹)ᵀ (upper), columns quantized one at a time, each column's error
  e = (w_j − ŵ_j)/U_jj spread onto the not-yet-quantized columns, e·U_j,j+1:, inside blocks of
  `block_size` columns with lazy updates of the columns after the block (one GEMM per block).

Groups: a group's scale and zero are chosen by RTN (the RTN pass's grid: integer zero by
default) on the group's *current*, already error-updated weights at the moment its first
column is reached. Without act_order that is the reference's behaviour; with act_order the
group's columns are scattered in processing order, but fitting the whole group when its first
column comes keeps the stored layout contiguous (the reference's "static groups" fit them on
the original weights instead). Columns of the group after the current block are brought up to
date exactly (W_p − E_block·U_block,p) before fitting, so groups wider than a block lose nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..compiler.passes import Pass, PassResult, register_pass
from ..errors import ConfigError
from . import primitives as P
from .common import (LayerProgress, PerLinearSchemes, WeightQuantConfig, _positive, bias_of,
                     calibrated_walk, from_weight, relative_output_error, rtn_dequantized)
from .linear import QuantLinear
from .scheme import QUANTIZERS, WeightScheme

log = logging.getLogger("mcomp.quant")


@dataclass(frozen=True)
class GPTQConfig(WeightQuantConfig):
    method: ClassVar[str] = "gptq"
    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    true_sequential: bool = True    # re-observe the layer after each input group is quantized
    integer_zero: bool = True       # the groups' RTN grid (see RTNConfig.integer_zero)

    def __post_init__(self):
        super().__post_init__()
        _positive(self, percdamp=self.percdamp, block_size=self.block_size)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)⁻¹, raising damp if H is not positive definite."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(5):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        log.debug("gptq: Hessian not positive definite with damp %.3g, retrying ×10", damp)
        damp *= 10
    raise ConfigError("gptq: the Hessian stays singular after dampening; more calibration data?")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, scheme: WeightScheme, *,
                  percdamp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  integer_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K), H (K, K) → codes (N, K) uint8, scale (N, G), zero (N, G) on `scheme`'s grid."""
    W = w.detach().float().clone()                                         # (N, K)
    N, K = W.shape
    H = H.detach().float().clone()                                         # (K, K)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    inv = torch.argsort(perm)                                              # column → position
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, percdamp * torch.diag(H).mean().item())       # (K, K) upper

    g, G, qmax = scheme.effective_group(K), scheme.groups(K), 2 ** scheme.bits - 1
    one_group = WeightScheme(bits=scheme.bits, group_size=0, symmetric=scheme.symmetric,
                             scale_dtype=scheme.scale_dtype, method=scheme.method)
    scale, zero = torch.zeros(N, G), torch.zeros(N, G)
    started = [False] * G
    codes = torch.zeros(N, K, dtype=torch.uint8)                           # processing order
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()                                           # (N, B)
        E1 = torch.zeros_like(W1)                                          # (N, B) scaled errors
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            gi = int(perm[i1 + i]) // g
            if not started[gi]:          # fit the group on its current (updated) weights
                pos = inv[gi * g: min((gi + 1) * g, K)]                    # all ≥ i1 + i
                here = pos < i2
                cur = torch.empty(N, pos.numel())
                cur[:, here] = W1[:, pos[here] - i1]
                later = pos[~here]
                cur[:, ~here] = W[:, later] - E1[:, :i] @ U[i1:i1 + i, later]
                s, z = P.rtn_params(cur, one_group, integer_zero=integer_zero)   # (N, 1)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
                started[gi] = True
            s, z = scale[:, gi], zero[:, gi]
            col = W1[:, i]
            q = (col / s + z).round().clamp(0, qmax)
            codes[:, i1 + i] = q.to(torch.uint8)
            err = (col - (q - z) * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes[:, inv], scale, zero


def quantize_linear(lin: nn.Linear, H: torch.Tensor, cfg: GPTQConfig,
                    scheme: WeightScheme | None = None) -> QuantLinear:
    scheme = scheme or cfg.scheme()
    codes, s, z = gptq_quantize(lin.weight, H, scheme, percdamp=cfg.percdamp,
                                block_size=cfg.block_size, act_order=cfg.act_order,
                                integer_zero=cfg.integer_zero)
    return QuantLinear.from_codes(codes, s, z, scheme, bias_of(lin))


def rtn_fallback(lin: nn.Linear, cfg: GPTQConfig, scheme: WeightScheme | None = None) -> QuantLinear:
    """The same grid without calibration, for linears outside the layer segments (lm_head)."""
    scheme = scheme or cfg.scheme()
    w = lin.weight.detach().float()
    s, z = P.rtn_params(w, scheme, integer_zero=cfg.integer_zero)
    return from_weight(w, s, z, scheme, bias_of(lin))


@register_pass
class QuantizeWeightsGPTQ(PerLinearSchemes, Pass):
    name = "quantize_weights_gptq"
    Config = GPTQConfig
    exact = False
    stage = "weights"
    on_layer: LayerProgress | None = None   # progress hook (layer, n_layers, stats), per instance

    def run(self, gm, ctx) -> PassResult:
        cfg: GPTQConfig = self.config

        def handle(layer, groups, stats):
            for group in groups:
                H = stats[group[0].args[0]].hessian
                for node in group:
                    lin = gm.get_submodule(node.target)
                    scheme = self.scheme_of(node)
                    qmod = quantize_linear(lin, H, cfg, scheme)
                    w = lin.weight.detach().float()
                    row = {"out_err": round(relative_output_error(w, qmod.dequantize(), H), 6),
                           "rtn_out_err": round(relative_output_error(
                               w, rtn_dequantized(w, scheme, cfg.integer_zero), H), 6)}
                    yield node, qmod, row

        def fallback(node):   # lm_head lies outside the layer segments: RTN on the same grid
            lin = gm.get_submodule(node.target)
            return rtn_fallback(lin, cfg, self.scheme_of(node)), {"method": "rtn"}

        stats = calibrated_walk(gm, ctx, cfg, self.name, handle, fallback,
                                cfg.true_sequential, self.on_layer)
        return PassResult(gm, stats)


QUANTIZERS.register("gptq", QuantizeWeightsGPTQ)
