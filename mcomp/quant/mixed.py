"""Sensitivity-driven mixed-precision weight quantization under a byte budget.

"What is the best model that fits in N megabytes?" The pass answers it per linear node:

1. sensitivity (quant/sensitivity.py): for every quantizable linear and every candidate format,
   the damage of quantizing that linear alone (KL against the fp model by default), measured on
   calibration windows and cached on disk;
2. allocation (quant/allocate.py): one format per linear minimizing the total damage subject to
   the budget, bytes counted exactly with `WeightScheme.nbytes` (codes + scales + zeros), solved
   exactly by HiGHS (scipy.optimize.milp) as a multiple-choice knapsack;
3. quantization: the chosen method's own pass (RTN, HQQ, GPTQ, AWQ from QUANTIZERS) runs once
   with the plan as its per-linear scheme map (`common.PerLinearSchemes`), so a mixed plan is
   quantized by exactly the code that quantizes uniform plans.

Budget, one of:
- `budget_bytes`: total weight bytes of the model after the pass, i.e. everything the artifact
  stores for weights (`ir.weight_bytes`): the fixed parts (embedding, norms, skipped linears such
  as the fp lm_head, biases) plus the chosen formats of the quantized linears;
- `avg_bits`: mean bits per weight over the quantized linears, scales and zeros included
  (8 · Σ bytes / Σ out·in).

The stats record the plan per linear (layer, role, shape, format, predicted bytes, sensitivity
of every candidate) and predicted vs measured total bytes, which must agree exactly.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from torch import fx, nn

from ..compiler import ir
from ..compiler.passes import Pass, PassConfig, PassResult, register_pass
from ..errors import ConfigError, PassError
from ..units import format_bytes, parse_bytes
from . import allocate, awq, gptq, hqq, rtn  # noqa: F401  (the quantizers register in QUANTIZERS)
from .common import LayerProgress, quantizable_linears
from .embedding import EMBED
from .scheme import QUANTIZERS, SCALE_DTYPES, WeightScheme
from .sensitivity import MEASURES, format_label, measure_sensitivity

# Default candidates (bits per weight on SmolLM2's 576-wide inputs, fp16 scale + zero per group):
#   2:g64  2.50  the only 2-bit worth offering (four levels over 128 weights destroy a linear);
#                taken only where a budget below ~3 bits forces it or a linear barely cares
#   3:pc   3.05  \
#   3:g256 3.16   } 3 and 4 bits at several group sizes: the small steps a plan needs to beat
#   3:g128 3.27   } a uniform format at that format's own size, paying for the linears it
#   3:g64  3.50   } gives more bits with coarser groups elsewhere rather than with 2-bit ones.
#   4:g256 4.16   } Measured on SmolLM2 (RTN, docs/benchmarks.md "mixed"): at the size of
#   4:g128 4.27   } uniform 3:g128 the plan's KL is 0.94× uniform with these nine formats,
#   4:g64  4.50  /  0.97× with {2:g64, 3:g128, 4:g128, 4:g64, 8:pc}; at 4:g128's, 0.89× vs 0.94×
#   8:pc   8.05  near-lossless for the few linears that matter most; group scales buy nothing
#                at 8 bits, and per-channel is what the fast int8 kernel runs
# More candidates cost `kl-scaled` almost nothing (it runs the model at two reference formats
# whatever the count); the full `kl` measure costs one partial forward per candidate. No g32:
# the offline checkpoints were dequantized from Q4_1 (g32) GGUFs, so 4:g32 reproduces them
# almost exactly and would look better than it is (shared/DESIGN.md).
DEFAULT_CANDIDATES = ("2:g64", "3:pc", "3:g256", "3:g128", "3:g64", "4:g256", "4:g128", "4:g64",
                      "8:pc")

# fields of the method's config that the plan sets (per linear) or that this config owns
_PLAN_FIELDS = ("bits", "group_size", "symmetric", "scale_dtype", "skip_roles", "skip_layers")


@dataclass(frozen=True)
class MixedConfig(PassConfig):
    method: str = "rtn"                 # quantizer of QUANTIZERS that quantizes the plan
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES   # BITS[:gGROUP] formats to choose from
    budget_bytes: int = 0               # total model weight bytes after the pass ("60MB" accepted)
    avg_bits: float = 0.0               # or: mean bits per quantized weight, scales/zeros counted
    symmetric: bool = False
    scale_dtype: str = "float16"
    skip_roles: tuple[str, ...] = ("lm_head",)
    skip_layers: tuple[int, ...] = ()
    method_options: dict = field(default_factory=dict)  # the method's own options (clip_search, ...)
    measure: str = "kl-scaled"          # sensitivity measure: kl-scaled | kl | hessian
    sens_samples: int = 4               # calibration windows the sensitivity runs on ...
    sens_seq_len: int = 128             # ... of this many tokens (BOS included)
    cache: bool = True                  # reuse / store sensitivity under $MCOMP_CACHE/sensitivity

    def __post_init__(self):
        if isinstance(self.budget_bytes, str):   # recipes may write budget_bytes = "60MB"
            object.__setattr__(self, "budget_bytes", parse_bytes(self.budget_bytes, "budget_bytes"))
        elif isinstance(self.budget_bytes, float):   # 6e7 in TOML
            object.__setattr__(self, "budget_bytes", int(self.budget_bytes))
        if (self.budget_bytes > 0) == (self.avg_bits > 0):
            raise ConfigError("mixed precision needs exactly one target: budget_bytes (e.g. "
                              "--weight-budget 60MB) or avg_bits (e.g. --weight-bits 3.5)")
        if self.budget_bytes < 0 or self.avg_bits < 0:
            raise ConfigError("mixed precision: the budget must be positive")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"mixed: scale dtype '{self.scale_dtype}'; "
                              f"choose one of {SCALE_DTYPES}")
        MEASURES.get(self.measure)
        if self.sens_samples < 1 or self.sens_seq_len < 2:
            raise ConfigError("mixed: sens_samples must be ≥ 1 and sens_seq_len ≥ 2")
        fixed = sorted(set(self.method_options) & set(_PLAN_FIELDS))
        if fixed:
            raise ConfigError(f"mixed: method_options {fixed} are set by the plan or by this pass's "
                              "own fields")
        schemes = self.schemes()
        if not schemes:
            raise ConfigError("mixed: give at least one candidate format")
        if len(set(schemes)) != len(schemes):
            raise ConfigError(f"mixed: duplicate candidate formats in {list(self.candidates)}")
        self.method_config()                     # validates the method and its options

    def method_config(self) -> PassConfig:
        """The chosen quantizer's config (skip rules and options; bits/group come per linear)."""
        cls = QUANTIZERS.get(self.method).Config
        return cls.from_dict({**self.method_options, "symmetric": self.symmetric,
                              "scale_dtype": self.scale_dtype, "skip_roles": list(self.skip_roles),
                              "skip_layers": list(self.skip_layers)},
                             where=f"mixed: method '{self.method}'")

    def schemes(self) -> list[WeightScheme]:
        from ..compiler.recipe import parse_format
        return [WeightScheme(**parse_format(c, f"mixed: candidate '{c}'"), symmetric=self.symmetric,
                             scale_dtype=self.scale_dtype, method=self.method)
                for c in self.candidates]


def embedding_plan(gm: fx.GraphModule, mcfg) -> WeightScheme | None:
    """The token embedding's format if the method's options quantize it (a fixed choice, not
    planned) and it is still float; None otherwise."""
    scheme = mcfg.embedding_scheme()
    return scheme if scheme is not None and isinstance(gm.get_submodule(EMBED), nn.Embedding) else None


def fixed_bytes(gm: fx.GraphModule, nodes: list[fx.Node], embedding: WeightScheme | None = None) -> int:
    """Weight bytes after the pass that do not depend on the plan: everything stored except the
    weight matrices of `nodes` (their biases stay fp32 and count here), with the token embedding
    at `embedding` if given (a tied head then shares that table). A quantized tied lm_head with
    a float embedding is untied: the embedding keeps the shared fp table, so its bytes stay."""
    total = ir.weight_bytes(gm)
    spec = ir.get_spec(gm)
    if embedding is not None:
        E = gm.get_submodule(EMBED).weight                                   # (V, H)
        total += embedding.nbytes(*E.shape) - E.numel() * E.element_size()
    for n in nodes:
        w = gm.get_submodule(n.target).weight
        if not (n.meta["mcomp"].role == "lm_head" and spec.tie_embeddings):
            total -= w.numel() * w.element_size()
    return total


def linear_budget(cfg: MixedConfig, fixed: int, sizes: list[list[int]], n_weights: int) -> int:
    """Bytes the quantized linears may take; a one-line ConfigError with the smallest reachable
    size (and the size beyond which nothing changes) if the target cannot be met."""
    lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    if cfg.budget_bytes:
        budget, asked = cfg.budget_bytes - fixed, format_bytes(cfg.budget_bytes)
    else:
        budget, asked = math.floor(cfg.avg_bits * n_weights / 8), f"{cfg.avg_bits:g} bits/weight"
    if budget < lo:
        smallest = (format_bytes(fixed + lo) if cfg.budget_bytes else
                    f"{8 * lo / n_weights:.3f} bits/weight = {format_bytes(fixed + lo)} in total")
        raise ConfigError(
            f"weight budget {asked} is unreachable: the smallest plan is {smallest} (every "
            f"linear at its smallest candidate; {format_bytes(fixed)} of embeddings, norms and "
            f"skipped linears are fixed); budgets above {format_bytes(fixed + hi)} (every linear "
            "at its largest candidate) change nothing")
    return budget


@register_pass
class QuantizeWeightsMixed(Pass):
    name = "quantize_weights_mixed"
    Config = MixedConfig
    exact = False
    stage = "weights"
    version = 1
    on_layer: LayerProgress | None = None   # progress hook (layer, n_layers, {"phase": ...})

    def run(self, gm, ctx) -> PassResult:
        cfg: MixedConfig = self.config
        mcfg = cfg.method_config()
        candidates = cfg.schemes()
        skipped: list = []
        nodes = quantizable_linears(gm, mcfg, skipped)
        embedding = embedding_plan(gm, mcfg)
        if embedding is not None and ir.get_spec(gm).tie_embeddings:
            # the quantizer installs the embedding first and the tied head shares its table
            for n in [n for n in nodes if n.meta["mcomp"].role == "lm_head"]:
                nodes.remove(n)
                skipped.append({"node": n.target, "reason": "tied to the quantized embedding"})
        if not nodes:
            raise ConfigError("mixed: no linear left to quantize (all skipped or already quantized)")
        shapes = [ir.linear_shape(gm.get_submodule(n.target)) for n in nodes]   # (out, in)
        sizes = [[sc.nbytes(N, K) for sc in candidates] for N, K in shapes]
        fixed = fixed_bytes(gm, nodes, embedding)
        n_weights = sum(N * K for N, K in shapes)
        # checked before measuring: an impossible budget costs no sensitivity run
        budget = linear_budget(cfg, fixed, sizes, n_weights)

        table = measure_sensitivity(
            gm, ctx, nodes, candidates, cfg.method, mcfg, measure=cfg.measure,
            n_samples=cfg.sens_samples, seq_len=cfg.sens_seq_len, use_cache=cfg.cache,
            progress=self.on_layer)
        costs = [table.row(n.target) for n in nodes]
        _, useful = allocate.bounds(costs, sizes)
        t0 = time.perf_counter()
        alloc = allocate.solve(costs, sizes, budget)
        solve_s = time.perf_counter() - t0
        plan = {n.target: candidates[j] for n, j in zip(nodes, alloc.choice)}

        quantizer = QUANTIZERS.get(cfg.method)(mcfg)
        quantizer.schemes = plan
        if self.on_layer is not None:
            hook = self.on_layer
            quantizer.on_layer = lambda i, n, s: hook(i, n, {"phase": "quantize", **s})
        inner = quantizer.run(gm, ctx)
        gm = inner.gm
        predicted = fixed + alloc.bytes
        measured = ir.weight_bytes(gm)
        if predicted != measured:   # the byte accounting is a contract, not an estimate
            raise PassError(f"predicted {predicted} weight bytes but the model holds {measured}",
                            pass_name=self.name)

        labels = table.candidates
        rows = []
        for n, (N, K), j, s in zip(nodes, shapes, alloc.choice, sizes):
            info = n.meta["mcomp"]
            rows.append({"node": n.target, "layer": info.layer, "role": info.role,
                         "shape": [N, K], "format": labels[j], "bytes": s[j],
                         "sensitivity": table.row(n.target)[j],
                         "sensitivities": dict(zip(labels, table.row(n.target)))})
        inner_stats = {k: v for k, v in inner.stats.items() if k not in ("scheme", "skipped")}
        stats = {
            "scheme": f"mixed:{cfg.method}", "method": cfg.method, "candidates": labels,
            "target": {"budget_bytes": cfg.budget_bytes or None, "avg_bits": cfg.avg_bits or None},
            "linear_budget_bytes": budget, "fixed_bytes": fixed,
            "embedding": embedding.label() if embedding is not None else None,
            "predicted_weight_bytes": predicted, "measured_weight_bytes": measured,
            "min_weight_bytes": fixed + sum(min(s) for s in sizes),
            "max_useful_weight_bytes": fixed + useful,
            "avg_bits": round(8 * alloc.bytes / n_weights, 4),
            "total_sensitivity": alloc.cost,
            "formats": dict(Counter(labels[j] for j in alloc.choice)),
            "sensitivity": {"measure": table.measure, "tokens": table.tokens,
                            "seconds": table.seconds, "cpu_seconds": table.cpu_seconds,
                            "cached": table.cached, "key": table.key[:32]},
            "solver": {"seconds": round(solve_s, 3), "status": alloc.status},
            "plan": rows, "skipped": skipped, "quantizer": inner_stats,
        }
        return PassResult(gm, stats)


# ------------------------------------------------------------------------------ reporting
def linear_formats(gm: fx.GraphModule) -> list[dict]:
    """Every linear node's stored format (`4:g128`, `fp32`) and bytes, read from the modules."""
    rows = []
    for node in ir.nodes_by_role(gm, *ir.LINEAR_ROLES):
        mod = gm.get_submodule(node.target)
        scheme = getattr(mod, "scheme", None)
        info = node.meta["mcomp"]
        rows.append({"node": node.target, "layer": info.layer, "role": info.role,
                     "shape": list(ir.linear_shape(mod)),
                     "format": format_label(scheme) if scheme is not None else "fp32",
                     "method": scheme.method if scheme is not None else None,
                     "bytes": ir.module_bytes(mod)})
    return rows


def plan_summary(manifest: dict | None, gm: fx.GraphModule) -> dict | None:
    """The mixed-precision plan of an artifact: the pass stats recorded in its manifest (per
    linear format, predicted bytes, sensitivity) and the bytes the loaded artifact holds. An
    artifact without those stats but with several formats gets the plan read from its modules."""
    measured = ir.weight_bytes(gm)
    manifest = manifest or {}
    records = [(p.get("name"), p.get("stats")) for p in (manifest.get("report") or {}).get("passes", [])]
    records += [(p.get("pass"), p.get("stats")) for p in manifest.get("pass_log") or []]
    stats = next((s for name, s in records if name == QuantizeWeightsMixed.name and s), None)
    if stats is not None:
        keep = ("method", "candidates", "target", "predicted_weight_bytes", "avg_bits", "formats",
                "total_sensitivity", "min_weight_bytes", "max_useful_weight_bytes", "sensitivity")
        return {**{k: stats.get(k) for k in keep}, "measured_weight_bytes": measured,
                "plan": stats.get("plan", []), "source": "manifest"}
    rows = [r for r in linear_formats(gm) if r["format"] != "fp32"]
    if len({r["format"] for r in rows}) < 2:
        return None
    return {"method": None, "predicted_weight_bytes": None, "measured_weight_bytes": measured,
            "formats": dict(Counter(r["format"] for r in rows)), "plan": rows, "source": "modules"}
