"""Shared pieces of the weight quantizer passes (RTN, HQQ, GPTQ, AWQ).

- `WeightQuantConfig`: the fields every quantizer config has (bits, group, symmetry, scale dtype,
  skip lists), validated once; each method's config subclasses it.
- `quantizable_linears` / `install`: which linear nodes a pass may replace (and why the others
  are skipped), and the replacement itself (unties a quantized tied lm_head whose embedding
  stays float). `Installer.embedding` quantizes the token embedding when the config asks
  (`embedding_bits`); a tied head then shares the quantized table (quant/embedding.py).
- `InputStats` / `collect_input_stats`: per shared input of a layer's linears, the fp32 Hessian
  H = 2·XᵀX/n and the mean |x| per channel, accumulated over calibration batches through
  `LayerwiseRunner.observe` (q/k/v, gate/up or the fused qkv/gate_up read one input, so they
  share one entry).
- `output_error`: tr(ΔHΔᵀ) per row — ‖XΔᵀ‖² on the calibration tokens without storing X.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Mapping

import torch
from torch import fx, nn

from ..compiler import ir
from ..compiler.passes import PassConfig
from ..errors import ConfigError
from . import primitives as P
from .embedding import quantize_embedding
from .linear import QuantLinear
from .scheme import SUPPORTED_BITS, WeightScheme

log = logging.getLogger("mcomp.quant")

# (layer index, number of layers, per-layer stats) after each block of a calibrated pass
LayerProgress = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class WeightQuantConfig(PassConfig):
    """Fields common to every weight quantizer. Subclasses set `method` and add their own."""

    method: ClassVar[str] = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: str = "float16"
    skip_roles: tuple[str, ...] = ("lm_head",)   # the embedding is never a linear here
    skip_layers: tuple[int, ...] = ()
    # Token embedding: 0 keeps the fp table; else it is quantized at these bits (group: the
    # linears' group_size unless given; symmetry and scale dtype: the linears'). Its grid comes
    # from `embedding_grid`, calibration-free for every method: an embedding has no input
    # activations to calibrate on. With tied embeddings the lm_head follows the table (one
    # shared quantized table), whatever skip_roles says.
    embedding_bits: int = 0
    embedding_group_size: int | None = None
    embedding_method: ClassVar[str] = "rtn"       # which core fits the embedding's grid

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"{self.method}: bits={self.bits}; choose one of {SUPPORTED_BITS}")
        if self.embedding_bits and self.embedding_bits not in SUPPORTED_BITS:
            raise ConfigError(f"{self.method}: embedding_bits={self.embedding_bits}; choose 0 "
                              f"(float) or one of {SUPPORTED_BITS}")
        unknown = set(self.skip_roles) - set(ir.LINEAR_ROLES)
        if unknown:
            raise ConfigError(f"{self.method}: unknown skip role(s) {sorted(unknown)}; "
                              f"valid: {', '.join(ir.LINEAR_ROLES)}")
        self.scheme()  # validates group size / scale dtype
        self.embedding_scheme()

    def scheme(self) -> WeightScheme:
        return WeightScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                            scale_dtype=self.scale_dtype, method=self.method)

    def embedding_scheme(self) -> WeightScheme | None:
        """The token embedding's scheme, or None when it stays float."""
        if not self.embedding_bits:
            return None
        g = self.group_size if self.embedding_group_size is None else self.embedding_group_size
        return WeightScheme(bits=self.embedding_bits, group_size=g, symmetric=self.symmetric,
                            scale_dtype=self.scale_dtype, method=self.embedding_method)

    def embedding_grid(self, w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) (V, G) of the embedding table w (V, H). Plain RTN here, on the config's
        integer-zero convention where it has one (GPTQ, AWQ); RTN and HQQ override it with
        their own cores."""
        return P.rtn_params(w, scheme, integer_zero=getattr(self, "integer_zero", True))


class PerLinearSchemes:
    """Mixin of the quantizer passes: which scheme each linear gets. A uniform plan (the default)
    uses the config's scheme everywhere; a mixed-precision plan (quant/mixed.py) sets `schemes`
    on the instance, a node target → scheme map (torchao's per-layer name → config map), and runs
    the same pass, so every method quantizes mixed plans with its own code."""

    schemes: Mapping[str, WeightScheme] | None = None

    def scheme_of(self, node: fx.Node) -> WeightScheme:
        if self.schemes is not None and node.target in self.schemes:
            return self.schemes[node.target]
        return self.config.scheme()


def _positive(cfg, **fields) -> None:
    for name, v in fields.items():
        if not v > 0:
            raise ConfigError(f"{cfg.method}: {name}={v} must be > 0")


# ------------------------------------------------------------------------------ the walk
def quantizable_linears(gm: fx.GraphModule, cfg: WeightQuantConfig,
                        skipped: list) -> list[fx.Node]:
    """Linear nodes (graph order) this config quantizes; the rest go to `skipped` with a reason."""
    out = []
    for node in ir.nodes_by_role(gm, *ir.LINEAR_ROLES):
        info = node.meta["mcomp"]
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.Linear):
            tied = info.role == "lm_head" and ir.get_spec(gm).tie_embeddings
            skipped.append({"node": node.target, "reason": "tied to the quantized embedding"
                            if tied else "already quantized"})
        elif info.role in cfg.skip_roles or info.layer in cfg.skip_layers:
            skipped.append({"node": node.target, "reason": "skip list"})
        else:
            out.append(node)
    return out


class Installer:
    """Replaces float linears by QuantLinears and keeps the pass's byte/tie bookkeeping."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.spec = ir.get_spec(gm)
        self.done = self.fp_bytes = self.packed_bytes = 0
        self.embedding_stats: dict | None = None

    def embedding(self, cfg: WeightQuantConfig) -> None:
        """Quantize the token embedding if `cfg` asks. Call it before `quantizable_linears`: a
        tied head then already shares the quantized table and the linear walk skips it."""
        scheme = cfg.embedding_scheme()
        if scheme is not None:
            self.embedding_stats = quantize_embedding(self.gm, scheme, cfg.embedding_grid)

    def __call__(self, node: fx.Node, qmod: QuantLinear) -> None:
        mod = self.gm.get_submodule(node.target)
        self.fp_bytes += mod.weight.numel() * mod.weight.element_size()
        self.packed_bytes += qmod.scheme.nbytes(qmod.out_features, qmod.in_features)
        ir.replace_module(self.gm, node.target, qmod)
        if node.meta["mcomp"].role == "lm_head" and self.spec.tie_embeddings:
            # the embedding keeps its fp table; the head now has its own quantized copy
            self.spec = dataclasses.replace(self.spec, tie_embeddings=False)
        self.done += 1

    def finish(self, scheme: WeightScheme, skipped: list, **extra) -> dict:
        ir.set_spec(self.gm, self.spec)
        self.gm.recompile()
        if self.embedding_stats is not None:
            extra["embedding"] = self.embedding_stats
        return {"scheme": scheme.label(), "quantized": self.done, "skipped": skipped,
                "fp_bytes": self.fp_bytes, "packed_bytes": self.packed_bytes, **extra}


def from_weight(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, scheme: WeightScheme,
                bias: torch.Tensor | None) -> QuantLinear:
    """QuantLinear for fp weight w (N, K) on the grid (s, z) (N, G)."""
    q = P.quantize_codes(w, s, z, scheme.bits, scheme.effective_group(w.shape[1]))
    return QuantLinear.from_codes(q, s, z, scheme, bias)


def bias_of(lin: nn.Linear) -> torch.Tensor | None:
    return None if lin.bias is None else lin.bias.detach()


# ------------------------------------------------------------------------------ calibration
class InputStats:
    """Running statistics of one linear input x (…, K): H = 2·XᵀX/n (fp32) and mean |x|."""

    def __init__(self, K: int):
        self.xtx = torch.zeros(K, K)
        self.abs_sum = torch.zeros(K)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()       # (n, K)
        self.xtx.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:                         # (K, K)
        return self.xtx * (2.0 / max(self.n, 1))

    @property
    def abs_mean(self) -> torch.Tensor:                        # (K,)
        return self.abs_sum / max(self.n, 1)


def input_groups(layer_nodes: Iterable[fx.Node], wanted: set) -> list[list[fx.Node]]:
    """The wanted linear nodes of one layer grouped by the input node they read, graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in layer_nodes:
        if node in wanted:
            groups.setdefault(node.args[0], []).append(node)
    return list(groups.values())


def collect_input_stats(runner, layer: int, groups: list[list[fx.Node]]) -> dict[fx.Node, InputStats]:
    """One scratch run of `layer` over the calibration batches: InputStats per group input."""
    first = {g[0]: g[0].args[0] for g in groups}
    stats: dict[fx.Node, InputStats] = {}

    def fn(node, args, out):
        key = first.get(node)
        if key is not None:
            x = args[0]
            stats.setdefault(key, InputStats(x.shape[-1])).add(x)

    runner.observe(layer, fn)
    return stats


def output_error(w: torch.Tensor, wh: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per row r: Δ_r H Δ_rᵀ with Δ = w − ŵ (N, K); with H = 2XᵀX/n that is 2/n·‖XΔ_rᵀ‖²."""
    d = w - wh
    return ((d @ H) * d).sum(-1)                              # (N,)


def relative_output_error(w: torch.Tensor, wh: torch.Tensor, H: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration tokens."""
    den = ((w @ H) * w).sum().clamp(min=1e-30)
    return float(output_error(w, wh, H).sum() / den)


def rtn_dequantized(w: torch.Tensor, scheme: WeightScheme, integer_zero: bool) -> torch.Tensor:
    """Plain RTN reconstruction of w on the scheme's grid (the baseline in pass stats)."""
    g = scheme.effective_group(w.shape[1])
    s, z = P.rtn_params(w, scheme, integer_zero=integer_zero)
    return P.dequantize_codes(P.quantize_codes(w, s, z, scheme.bits, g), s, z, g)


def rtn_grid(w: torch.Tensor, scheme: WeightScheme, integer_zero: bool,
             H: torch.Tensor | None = None, clip_grid: int = 0, min_ratio: float = 0.5):
    """Per-group (scale, zero) by RTN, optionally with a clipping search that minimizes each
    group's output error Δ_g H_gg Δ_gᵀ (H given) or its squared weight error (H None)."""
    if clip_grid <= 1:
        return P.rtn_params(w, scheme, integer_zero=integer_zero)
    N, K = w.shape
    g = scheme.effective_group(K)
    G = scheme.groups(K)
    wg = P.pad_groups(w.float(), g)                                        # (N, G, g)
    Hg = None
    if H is not None:
        Hp = torch.nn.functional.pad(H, (0, G * g - K, 0, G * g - K))
        idx = torch.arange(G)
        Hg = Hp.view(G, g, G, g)[idx, :, idx, :]                           # (G, g, g)
    best_s = best_z = best_err = None
    for c in torch.linspace(1.0, min_ratio, clip_grid).tolist():
        s, z = P.rtn_params(w, scheme, clip=c, integer_zero=integer_zero)
        q = P.quantize_codes(w, s, z, scheme.bits, g)
        d = P.pad_groups(P.dequantize_codes(q, s, z, g), g) - wg           # (N, G, g)
        if Hg is None:
            err = d.pow(2).sum(-1)                                         # (N, G)
        else:
            err = (torch.einsum("ngi,gij->ngj", d, Hg) * d).sum(-1)        # (N, G)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def report_layer(name: str, layer: int, n_layers: int, layer_stats: dict,
                 progress: LayerProgress | None) -> None:
    log.info("%s: layer %d/%d %s", name, layer + 1, n_layers, layer_stats)
    if progress is not None:
        progress(layer, n_layers, layer_stats)


# (layer, input groups of this stage, {input node: InputStats}) → [(node, QuantLinear, stats row)]
StageFn = Callable[[int, list, dict], Iterable[tuple]]


def calibrated_walk(gm: fx.GraphModule, ctx, cfg: WeightQuantConfig, pass_name: str,
                    handle: StageFn, fallback: Callable[[fx.Node], dict],
                    sequential: bool, progress: LayerProgress | None) -> dict:
    """Block-by-block driver of the calibrated quantizers.

    For each layer, the quantizable linears are grouped by shared input; `sequential` handles
    one input group at a time with a fresh observation (later groups of the layer then see the
    earlier ones already quantized), else all groups from one observation. `handle` quantizes
    (and installs, through `install`) the linears of the groups it is given. After the layer,
    the runner advances through the transformed layer, so layer i+1 is calibrated on what the
    quantized layers 0..i produce. Linears outside the layer segments (lm_head, when asked
    for) go to `fallback`. Returns the pass stats."""
    from ..compiler.calibrate import LayerwiseRunner

    if ctx is None:
        raise ConfigError(f"{pass_name} calibrates: it needs a CompileContext with calibration text")
    skipped: list = []
    install = Installer(gm)
    install.embedding(cfg)   # calibration-free (RTN core): an embedding has no input activations
    nodes = quantizable_linears(gm, cfg, skipped)
    wanted = set(nodes)
    runner = LayerwiseRunner(gm, ctx.calibration_batches())
    layers = []
    for i in range(runner.n_layers):
        groups = input_groups(runner.layers[i], wanted)
        per_linear: dict = {}
        for stage in ([[g] for g in groups] if sequential else [groups]) if groups else []:
            stats = collect_input_stats(runner, i, stage)
            for node, qmod, row in handle(i, stage, stats):
                install(node, qmod)
                per_linear[node.meta["mcomp"].role] = row
        runner.advance(i)
        if per_linear:
            layers.append({"layer": i, **per_linear})
            report_layer(pass_name, i, runner.n_layers, per_linear, progress)
    for node in nodes:
        if node.meta["mcomp"].layer is None:
            qmod, row = fallback(node)
            install(node, qmod)
            layers.append({"layer": None, node.meta["mcomp"].role: row})
    tokens = sum(b.numel() for b in ctx.calibration_batches())
    return install.finish(cfg.scheme(), skipped, layers=layers, calibration_tokens=tokens)
