"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling, folded exactly, then RTN.

Per layer, from one observation of the calibration set (through the already quantized layers
before it), for every group of linears sharing an input x (K channels):

    s_x = mean |x| per channel;  for α on a grid in [0, 1]:  s = s_x^α / √(max·min)
    err(α) = Σ_linears tr(Δ H Δᵀ),  Δ = W − Q(W·diag(s))·diag(s)⁻¹,  H = 2XᵀX/n

(‖XWᵀ − X·diag(s)⁻¹·Q(W·diag(s))ᵀ‖² summed over the group's outputs, computed from H so no
activations are stored; α = 0 is plain RTN, so the search never loses to it on this measure).
The best s is folded into the op producing x, which is exact in floating point:

- x = norm(h): the RMSNorm/LayerNorm weight (and LayerNorm bias) is divided by s and the
  linears' columns multiplied by s — only when the norm's output feeds nothing but these
  linears (else another reader would see x/s);
- down_proj of a gated MLP, x = act(gate)·up: up_proj's rows (the up half of a fused
  gate_up_proj) are divided by s, down_proj's columns multiplied by s — only when the up
  output has no other reader;
- anything else (o_proj; v_proj → o_proj is not folded, it needs per-KV-head scale sharing
  under GQA) gets no scale, only the quantization below.

Then every linear of the layer is quantized by RTN (integer zero point by default) with an
optional clipping search per (row, group) that minimizes the group's output error
Δ_g H_gg Δ_gᵀ on the scaled inputs. All of a layer's scales are searched and folded on fp
weights before any of its linears is quantized (the fold into up_proj needs it still float).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from ..compiler import ir
from ..compiler.model import LayerNorm, RMSNorm
from ..compiler.passes import Pass, PassResult, register_pass
from . import primitives as P
from .common import (LayerProgress, PerLinearSchemes, WeightQuantConfig, _positive, bias_of,
                     calibrated_walk, from_weight, output_error, relative_output_error,
                     rtn_dequantized, rtn_grid)
from .scheme import QUANTIZERS, WeightScheme


@dataclass(frozen=True)
class AWQConfig(WeightQuantConfig):
    method: ClassVar[str] = "awq"
    n_grid: int = 20                # α ∈ {0, 1/n, …, (n−1)/n}
    clip_search: bool = True
    clip_grid: int = 20
    min_clip: float = 0.5
    integer_zero: bool = True       # see RTNConfig.integer_zero

    def __post_init__(self):
        super().__post_init__()
        _positive(self, n_grid=self.n_grid, clip_grid=self.clip_grid, min_clip=self.min_clip)


@dataclass(frozen=True)
class FoldSite:
    """Where an input scale folds: 'norm' (module target) or 'up' (module target, row offset)."""
    kind: str
    target: str
    rows: tuple[int, int] = (0, 0)      # up rows [start, stop) for kind 'up'


def fold_site(gm: fx.GraphModule, group: list[fx.Node]) -> FoldSite | None:
    """The exact fold site for the shared input of `group`, or None (see module doc)."""
    x = group[0].args[0]
    members = set(group)
    if not all(isinstance(gm.get_submodule(n.target), nn.Linear) for n in group):
        return None
    if x.op == "call_module" and isinstance(gm.get_submodule(x.target), (RMSNorm, LayerNorm)):
        # the attention node takes the normed input too (the cache boundary): dense and KIVI
        # ignore it, and xquant derives its latent basis from this group's K/V weights when its
        # cache is built, so it sees the folded weights with the scaled input (still exact)
        users = {u for u in x.users if u.meta["mcomp"].role != "attn"}
        return FoldSite("norm", x.target) if users <= members else None
    roles = {n.meta["mcomp"].role for n in group}
    if roles != {"down_proj"} or not ir.get_spec(gm).gated_mlp:
        return None
    if not (x.op == "call_function" and x.target in (operator.mul, torch.mul) and len(x.args) == 2):
        return None
    for src in x.args:     # the up operand: up_proj itself, or getitem(split(gate_up_proj), 1)
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        if src.op == "call_module" and src.meta["mcomp"].role == "up_proj":
            mod = gm.get_submodule(src.target)
            if isinstance(mod, nn.Linear):
                return FoldSite("up", src.target, (0, mod.out_features))
        if src.op == "call_function" and src.target is operator.getitem and src.args[1] == 1:
            split = src.args[0]
            fused = split.args[0] if split.op == "call_method" and split.target == "split" else None
            if (fused is not None and fused.op == "call_module"
                    and fused.meta["mcomp"].role == "gate_up_proj"
                    and isinstance(gm.get_submodule(fused.target), nn.Linear)):
                sizes = split.args[1]
                return FoldSite("up", fused.target, (sizes[0], sizes[0] + sizes[1]))
    return None


@torch.no_grad()
def apply_scale(gm: fx.GraphModule, site: FoldSite, group: list[fx.Node], s: torch.Tensor) -> None:
    """x → x / s at the source, W → W·diag(s) in the group's linears: the fp function is unchanged."""
    src = gm.get_submodule(site.target)
    if site.kind == "norm":
        src.weight.div_(s)
        if getattr(src, "bias", None) is not None:
            src.bias.div_(s)
    else:
        a, b = site.rows
        src.weight[a:b].div_(s[:, None])
        if src.bias is not None:
            src.bias[a:b].div_(s)
    for node in group:
        gm.get_submodule(node.target).weight.mul_(s[None, :])


def search_scale(weights: list[torch.Tensor], H: torch.Tensor, x_abs: torch.Tensor,
                 scheme: WeightScheme, n_grid: int, integer_zero: bool) -> tuple[torch.Tensor, float, dict]:
    """Best s = s_x^α over the α grid → (s (K,), α, {"err": …, "err_alpha0": …})."""
    g = scheme.effective_group(H.shape[0])
    sx = x_abs.float().clamp(min=1e-4)
    best = None
    errs = []
    for alpha in [k / n_grid for k in range(n_grid)]:
        s = sx.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            ws = w * s[None, :]
            sc, z = P.rtn_params(ws, scheme, integer_zero=integer_zero)
            wh = P.dequantize_codes(P.quantize_codes(ws, sc, z, scheme.bits, g), sc, z, g) / s[None, :]
            err += float(output_error(w, wh, H).sum())
        errs.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], {"err": best[0], "err_alpha0": errs[0]}


@register_pass
class QuantizeWeightsAWQ(PerLinearSchemes, Pass):
    name = "quantize_weights_awq"
    Config = AWQConfig
    exact = False
    stage = "weights"
    on_layer: LayerProgress | None = None   # progress hook (layer, n_layers, stats), per instance

    def _quantize(self, lin: nn.Linear, H: torch.Tensor | None, scheme: WeightScheme):
        cfg: AWQConfig = self.config
        w = lin.weight.detach().float()
        s, z = rtn_grid(w, scheme, cfg.integer_zero, H,
                        cfg.clip_grid if cfg.clip_search else 0, cfg.min_clip)
        return from_weight(w, s, z, scheme, bias_of(lin))

    def run(self, gm, ctx) -> PassResult:
        cfg: AWQConfig = self.config

        def handle(layer, groups, stats):
            plan = []
            for group in groups:                      # 1. search and fold every scale (fp)
                st = stats[group[0].args[0]]
                H = st.hessian
                ws = [gm.get_submodule(n.target).weight.detach().float() for n in group]
                schemes = [self.scheme_of(n) for n in group]
                rtn_err = [relative_output_error(w, rtn_dequantized(w, sc, cfg.integer_zero), H)
                           for w, sc in zip(ws, schemes)]   # plain RTN on the unscaled layer
                site = fold_site(gm, group)
                info: dict = {"alpha": None}
                if site is not None:
                    # one shared scale per group: a mixed plan that splits a group (unfused
                    # q/k/v) searches it on the group's narrowest format, the most damaged one
                    coarsest = min(schemes, key=lambda sc: sc.bits)
                    s, alpha, _ = search_scale(ws, H, st.abs_mean, coarsest, cfg.n_grid,
                                               cfg.integer_zero)
                    apply_scale(gm, site, group, s)
                    H = H / (s[:, None] * s[None, :])  # the linears now read x / s
                    info = {"alpha": alpha, "fold": site.kind}
                plan.append((group, H, info, rtn_err))
            for group, H, info, rtn_err in plan:      # 2. quantize on the scaled inputs
                for node, r in zip(group, rtn_err):
                    lin = gm.get_submodule(node.target)
                    qmod = self._quantize(lin, H, self.scheme_of(node))
                    # ‖X'W'ᵀ − X'Ŵᵀ‖ with X' = X/s, W' = W·diag(s): the error in the model
                    err = relative_output_error(lin.weight.detach().float(), qmod.dequantize(), H)
                    yield node, qmod, {**info, "out_err": round(err, 6), "rtn_out_err": round(r, 6)}

        def fallback(node):   # lm_head lies outside the layer segments: weight-only RTN + clip
            lin = gm.get_submodule(node.target)
            return self._quantize(lin, None, self.scheme_of(node)), {"method": "rtn"}

        stats = calibrated_walk(gm, ctx, cfg, self.name, handle, fallback, False, self.on_layer)
        return PassResult(gm, stats)


QUANTIZERS.register("awq", QuantizeWeightsAWQ)
