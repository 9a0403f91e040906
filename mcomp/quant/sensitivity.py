"""Per-linear sensitivity to each candidate weight format, measured on calibration data, cached.

The mixed-precision planner (quant/mixed.py) needs, for every quantizable linear node l (one
node: the fused qkv_proj, o_proj, gate_up_proj, down_proj of each layer) and every candidate
format c, the damage of quantizing l ALONE to c, everything else left in floating point. The
measures (MEASURES) share one walk over the fp model: a `LayerwiseRunner` over a small
calibration subset (`n_samples` windows × `seq_len` tokens, evenly spaced over the calibration
text) that keeps the fp state entering each block, so scoring a linear of block i reruns only
blocks i..L-1 and the head, and the fp log-probabilities are computed once.

- `kl`: mean KL(fp logits ‖ logits with l at c) per token, for every (l, c). What the user is
  scored on, end to end, including how damage in block i propagates. One partial forward per
  (linear, candidate): 1080 on SmolLM2-135M (30 layers × 4 fused linears × 9 default candidates).
- `kl-scaled` (the default): the exact KL of l at a few reference formats (REFERENCE_FORMATS:
  2:g64 and 3:g128) and, for every other candidate, the KL of the reference of its bit width
  (else the nearest in bits) times the ratio of their layer-local output errors:
      s(l, c) = KL(l, ref) · e(l, c) / e(l, ref),   e = tr(ΔW H ΔWᵀ),  H = 2XᵀX/n
  (`common.output_error`, X the linear's fp calibration inputs). The KL carries what only the
  model's output shows — how much an error in this linear, at this depth, costs; the ratio
  between nearby formats of one linear is what a local measure gets right (to second order, KL
  is a quadratic form in ΔW, and those formats are RTN grids with alike error statistics).
  Two partial forwards per linear. Why two: scaled from 3:g128, the 2-bit KL of single linears
  was off by 0.35–3.7× against the exact `kl` (median 0.99) on SmolLM2, and plans at 3-bit
  sizes hinge on which linears may drop to 2 bits (docs/benchmarks.md, "mixed").
- `hessian`: e(l, c) alone. No rerun at all, but in units of each linear's own output: on
  SmolLM2 it grows by five orders of magnitude from layer 0 to layer 29 while the KLs do not,
  so it cannot compare linears; for quick experiments.

Candidate weights come from the calibration-free core of the quantizer that will finally
quantize the model (CORES): RTN with its clip-search setting and HQQ are exactly what the plan
installs; GPTQ and AWQ are calibrated walks whose per-linear result depends on the layers
before it, so their plans are measured with a proxy, RTN with the per-group clipping search
(AWQ's own weight-only core; GPTQ lowers every format's error by a similar factor).

Results are cached as JSON under $MCOMP_CACHE/sensitivity/ (default ~/.cache/mcomp), the folder
of the GGUF conversion cache, keyed by a sha256 over: the model's weights and spec, the exact
calibration token windows, the measure, the candidate schemes, the method and its options, the
set of linears and SENSITIVITY_VERSION. Files are written atomically (temp file + rename), so a
second planning run on the same inputs — another budget, another bit target — costs a hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..compiler import ir
from ..compiler.calibrate import LayerwiseRunner
from ..compiler.context import windows
from ..errors import ConfigError
from ..registry import Registry
from . import hqq, primitives as P, rtn
from .common import (InputStats, LayerProgress, collect_input_stats, input_groups,
                     output_error)
from .scheme import WeightScheme

log = logging.getLogger("mcomp.quant")

# Bump when a measure or a core changes what it computes: old cache entries stop matching.
SENSITIVITY_VERSION = 1

@dataclass(frozen=True)
class Core:
    """How a method's candidate weights are made. `fit(w (N, K), scheme, method config)` →
    per-group (scale, zero) (N, G): the grid the method's pass computes for that linear
    (rtn.quantize_linear, hqq.quantize_linear); the candidate's weight is dequantize(quantize(w))
    on it — QuantLinear.dequantize() of what the pass installs, without packing codes only to
    unpack them. `options`: the config fields `fit` reads, the only ones in the cache key, so a
    new unrelated config field does not invalidate measured tables."""

    fit: Callable[[torch.Tensor, WeightScheme, object], tuple[torch.Tensor, torch.Tensor]]
    options: tuple[str, ...]


CORES: Registry = Registry("sensitivity quantizer core")
CORES.register("rtn", Core(lambda w, sc, cfg: (
    rtn.clip_search(w, sc, cfg.integer_zero) if cfg.clip_search
    else P.rtn_params(w, sc, integer_zero=cfg.integer_zero)), ("clip_search", "integer_zero")))
CORES.register("hqq", Core(lambda w, sc, cfg: hqq.hqq_params(
    w, sc, cfg.lp_norm, cfg.beta, cfg.kappa, cfg.iters, cfg.optimize_scale, cfg.round_zero),
    ("lp_norm", "beta", "kappa", "iters", "optimize_scale", "round_zero")))
# calibrated methods: a calibration-free proxy (see the module doc)
for _m in ("gptq", "awq"):
    CORES.register(_m, Core(lambda w, sc, cfg: rtn.clip_search(w, sc, cfg.integer_zero),
                            ("integer_zero",)))


def candidate_weight(lin: nn.Linear, scheme: WeightScheme, core: Core, cfg) -> torch.Tensor:
    """The (N, K) fp32 weight `lin` has after quantization to `scheme` by `core`."""
    w = lin.weight.detach().float()
    g = scheme.effective_group(w.shape[1])
    s, z = core.fit(w, scheme, cfg)
    return P.dequantize_codes(P.quantize_codes(w, s, z, scheme.bits, g), s, z, g)


def format_label(scheme: WeightScheme) -> str:
    """`4:g128`, `8:pc`: the BITS[:gGROUP] text the candidate was given as."""
    return f"{scheme.bits}:{f'g{scheme.group_size}' if scheme.group_size else 'pc'}"


# ------------------------------------------------------------------------------ results
@dataclass
class SensitivityTable:
    """values[i][j]: damage of quantizing linear i (targets[i]) alone to candidate j."""

    measure: str
    candidates: list[str]                  # format labels, one per column
    targets: list[str]
    values: list[list[float]]
    tokens: int                            # calibration tokens the measure ran on
    seconds: float                         # wall time it took to compute (not to load) ...
    cpu_seconds: float                     # ... and CPU time (all threads): fairer when shared
    key: str
    cached: bool = False                   # loaded from the cache by this call

    def row(self, target: str) -> list[float]:
        return self.values[self.targets.index(target)]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SensitivityTable":
        d.setdefault("cpu_seconds", None)          # entries written before it was recorded
        return cls(**d, cached=True)


# ------------------------------------------------------------------------------ the walk
class _Probe(LayerwiseRunner):
    """The fp model walked block by block over the calibration batches. At its current block it
    gives the Hessians of the block's linear inputs and the KL of the model's output when one
    linear's weight is replaced: the fp state entering the block is computed once (the runner's
    layer boundary), and a replaced linear reruns only the blocks from there on and the
    epilogue, on scratch copies of that state."""

    def __init__(self, gm: fx.GraphModule, batches: list[torch.Tensor], logits: bool):
        super().__init__(gm, batches)
        self.n_tokens = sum(b.numel() for b in batches)
        self.ref = []                                       # per batch: fp (log p, p), (b, T, V)
        if logits:
            for out in self.tail():
                lp = F.log_softmax(out.float(), -1)
                self.ref.append((lp, lp.exp()))

    def tail(self, fn=None) -> list[torch.Tensor]:
        """Logits per batch from the current block to the end; fn(node, args, out) sees every
        node run. The boundary state is not changed."""
        outs = []
        with torch.inference_mode():
            for env in self.envs:
                scratch = dict(env)
                for i in range(self._next, self.n_layers):
                    self._run(self.layers[i], scratch, fn)
                self._run(self.post, scratch, fn)
                self._interp.env = scratch
                outs.append(self._interp.run_node(self._output))
        return outs

    def hessians(self, nodes: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
        """H = 2XᵀX/n of each node's input at the current block (after the last block: in the
        epilogue, for an lm_head)."""
        if self._next < self.n_layers:
            groups = input_groups(self.layers[self._next], set(nodes))
            stats = collect_input_stats(self, self._next, groups)
        else:
            stats: dict = {}

            def collect(node, args, out):
                if node in nodes:
                    stats.setdefault(node.args[0], InputStats(args[0].shape[-1])).add(args[0])

            self.tail(collect)
        return {n: stats[n.args[0]].hessian for n in nodes}

    def kl(self, node: fx.Node, w: torch.Tensor) -> float:
        """Mean KL(fp ‖ model with `node`'s weight replaced by w) per token."""
        lin = self.gm.get_submodule(node.target)
        with _swap(self.gm, node.target, _fp_linear(w, lin.bias)):
            outs = self.tail()
        kl = sum(float((p * (lp - F.log_softmax(q.float(), -1))).sum())
                 for (lp, p), q in zip(self.ref, outs))
        return max(kl / self.n_tokens, 0.0)


class _swap:
    """Temporarily replace the module at a linear node's target (restored on any exit). A new
    module rather than an in-place weight copy: a tied lm_head must not change the embedding."""

    def __init__(self, gm: fx.GraphModule, target: str, new: nn.Module):
        self.gm, self.target, self.new = gm, target, new

    def __enter__(self):
        self.old = self.gm.get_submodule(self.target)
        ir.replace_module(self.gm, self.target, self.new)

    def __exit__(self, *exc):
        ir.replace_module(self.gm, self.target, self.old)


def _fp_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An fp32 linear holding the candidate's dequantized weight: QuantLinear's reference
    semantics, without the kernel selector (the fast int kernels compute in bf16)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


# ------------------------------------------------------------------------------ measures
MEASURES: Registry = Registry("sensitivity measure")
# kl-scaled measures these candidates exactly and scales the others from them by their output
# errors: 3:g128, the usual 3-bit point, where budgets between 3 and 4 bits make their choices
# and far enough from fp that its KL stands well above the noise of a 512-token sample; and
# 2:g64, whose damage is too far from 3-bit's to extrapolate (module doc).
REFERENCE_FORMATS = ("2:g64", "3:g128")
# score(probe at the node's block, node, candidates, candidate weights, H or None) → one row
Score = Callable[[_Probe, fx.Node, Sequence[WeightScheme], list[torch.Tensor], "torch.Tensor | None"],
                 list[float]]


@dataclass(frozen=True)
class Measure:
    score: Score
    hessian: bool       # needs the Hessians of the linears' inputs
    logits: bool        # needs the fp log-probabilities (reruns the model per scored weight)
    version: int = 1    # bump when the measure's definition changes (part of the cache key)


def _kl_row(probe, node, candidates, ws, H) -> list[float]:
    return [probe.kl(node, w) for w in ws]


def _hessian_row(probe, node, candidates, ws, H) -> list[float]:
    w = probe.gm.get_submodule(node.target).weight.detach().float()
    return [float(output_error(w, wq, H).sum()) for wq in ws]


def reference_candidates(candidates: Sequence[WeightScheme]) -> list[int]:
    """For each candidate, the index of the candidate `kl-scaled` scales it from: the offered
    REFERENCE_FORMATS measure themselves; any other candidate uses the reference of its bit
    width, else the nearest in bits (the wider on a tie). Without any reference offered, the
    median candidate by bits (then by group size, coarser first) is the one reference."""
    labels = [format_label(c) for c in candidates]
    refs = [labels.index(f) for f in REFERENCE_FORMATS if f in labels]
    if not refs:
        order = sorted(range(len(candidates)),
                       key=lambda j: (candidates[j].bits, -(candidates[j].group_size or 1 << 30)))
        refs = [order[(len(order) - 1) // 2]]
    return [min(refs, key=lambda r: (abs(candidates[r].bits - c.bits), -candidates[r].bits))
            for c in candidates]


def _kl_scaled_row(probe, node, candidates, ws, H) -> list[float]:
    err = _hessian_row(probe, node, candidates, ws, H)
    ref = reference_candidates(candidates)
    kl = {r: probe.kl(node, ws[r]) for r in sorted(set(ref))}
    # a reference that is lossless here (zero output error) makes everything scaled from it so
    return [kl[r] * e / err[r] if err[r] > 0 else (kl[r] if e > 0 else 0.0)
            for e, r in zip(err, ref)]


MEASURES.register("kl", Measure(_kl_row, hessian=False, logits=True))
MEASURES.register("hessian", Measure(_hessian_row, hessian=True, logits=False))
# version 2: two references (2:g64, 3:g128) instead of 3:g128 alone
MEASURES.register("kl-scaled", Measure(_kl_scaled_row, hessian=True, logits=True, version=2))


def _walk(gm: fx.GraphModule, nodes: Sequence[fx.Node], candidates: Sequence[WeightScheme],
          quantize: Callable[[nn.Linear, WeightScheme], torch.Tensor], batches: list[torch.Tensor],
          measure: Measure, progress: LayerProgress | None) -> dict[str, list[float]]:
    """Score every node at its block, walking the fp model once, block by block."""
    probe = _Probe(gm, batches, logits=measure.logits)
    L = probe.n_layers
    todo: dict[int, list[fx.Node]] = {}       # per block; linears outside blocks (lm_head) at L
    for n in nodes:
        layer = n.meta["mcomp"].layer
        todo.setdefault(L if layer is None else layer, []).append(n)
    out: dict[str, list[float]] = {}
    for i in range(L + 1):
        here = todo.get(i, [])
        Hs = probe.hessians(here) if here and measure.hessian else {}
        for node in here:
            lin = gm.get_submodule(node.target)
            ws = [quantize(lin, sc) for sc in candidates]
            out[node.target] = measure.score(probe, node, candidates, ws, Hs.get(node))
        if i < L:
            probe.advance(i)
            if progress is not None:
                progress(i, L, {"phase": "sensitivity"})
    return out


# ------------------------------------------------------------------------------ cache
def cache_dir() -> Path:
    from ..compiler.frontend.base import cache_root
    return cache_root() / "sensitivity"


def model_fingerprint(gm: fx.GraphModule) -> str:
    """sha256 over the spec and every stored tensor (name, dtype, shape, bytes), ties once."""
    h = hashlib.sha256(json.dumps(ir.get_spec(gm).to_dict(), sort_keys=True, default=str).encode())
    seen = set()
    for name, t in sorted(gm.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)           # mkstemp makes it owner-only; it is a plain cache file
        os.replace(tmp, path)          # readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, key: str) -> SensitivityTable | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("key") != key:
            return None
        return SensitivityTable.from_json(d)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:    # a damaged entry is recomputed, not fatal
        log.warning("sensitivity cache %s unreadable (%s); recomputing", path, e)
        return None


# ------------------------------------------------------------------------------ entry point
def calibration_windows(ctx, n_samples: int, seq_len: int) -> torch.Tensor:
    """(n, seq_len) evenly spaced calibration windows, BOS first: the measures' token subset."""
    if ctx is None:
        raise ConfigError("sensitivity is measured on calibration text: it needs a CompileContext")
    return windows(ctx.calib_ids, n_samples, seq_len, ctx.bos_id)


def sensitivity_key(gm: fx.GraphModule, ids: torch.Tensor, nodes: Sequence[fx.Node],
                    candidates: Sequence[WeightScheme], method: str, method_config,
                    measure: str) -> str:
    """sha256 over everything the measured values depend on (see the module doc)."""
    material = {
        "version": SENSITIVITY_VERSION, "model": model_fingerprint(gm),
        "measure": [measure, MEASURES.get(measure).version],
        "calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "candidates": [sc.to_dict() for sc in candidates], "method": method,
        "options": {k: getattr(method_config, k) for k in CORES.get(method).options},
        "linears": [n.target for n in nodes],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def measure_sensitivity(gm: fx.GraphModule, ctx, nodes: Sequence[fx.Node],
                        candidates: Sequence[WeightScheme], method: str, method_config, *,
                        measure: str = "kl", n_samples: int = 4, seq_len: int = 128,
                        batch_size: int = 4, use_cache: bool = True,
                        progress: LayerProgress | None = None) -> SensitivityTable:
    """Sensitivity of every node in `nodes` to every candidate (cached; see the module doc).

    `method_config` is the method's own pass config (its options decide the candidates'
    weights: RTN's clip search, HQQ's solver settings); its bits/group/skip fields are unused."""
    how: Measure = MEASURES.get(measure)
    core: Core = CORES.get(method)
    ids = calibration_windows(ctx, n_samples, seq_len)
    key = sensitivity_key(gm, ids, nodes, candidates, method, method_config, measure)
    path = cache_dir() / f"{key[:32]}.json"
    if use_cache:
        hit = _load(path, key)
        if hit is not None:
            log.info("sensitivity: cache hit %s", path)
            return hit
    t0, c0 = time.perf_counter(), time.process_time()
    values = _walk(gm, nodes, candidates,
                   lambda lin, sc: candidate_weight(lin, sc, core, method_config),
                   list(ids.split(batch_size)), how, progress)
    table = SensitivityTable(measure=measure, candidates=[format_label(c) for c in candidates],
                             targets=[n.target for n in nodes],
                             values=[values[n.target] for n in nodes], tokens=ids.numel(),
                             seconds=round(time.perf_counter() - t0, 2),
                             cpu_seconds=round(time.process_time() - c0, 2), key=key)
    log.info("sensitivity (%s): %d linears × %d candidates on %d tokens in %.1fs (CPU %.1fs)",
             measure, len(nodes), len(candidates), ids.numel(), table.seconds, table.cpu_seconds)
    if use_cache:
        try:
            _atomic_write_json(path, table.to_json())
        except OSError as e:     # a read-only cache costs time later, not correctness now
            log.warning("cannot write sensitivity cache %s: %s", path, e)
    return table
