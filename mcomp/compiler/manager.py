"""PassManager: run passes in order, verify the IR after each one, and keep a report."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import fx

from ..errors import MCompError, PassError
from . import ir
from .context import CompileContext
from .passes import Pass
from .verify import ProbeRun, drift, kv_specs, probe, verify_kv, verify_pass

log = logging.getLogger("mcomp.passes")


@dataclass(frozen=True)
class VerifyConfig:
    enabled: bool = True
    exact_atol: float = 1e-4        # relative to the probe logits' max magnitude
    max_kld: float | None = None    # fail a lossy pass that drifts further than this
    # after a pass that sets or changes a KV representation: prefill, then decode through the
    # real caches past their lossy window (verify.verify_kv)
    kv: bool = True
    kv_prefill: int = 16

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PassRecord:
    name: str
    version: int
    config: dict
    exact: bool
    seconds: float
    stats: dict
    drift: dict | None          # against the IR before this pass
    drift_total: dict | None    # against the imported model
    kv_drift: dict | None       # decode through the caches vs the no-cache forward (KV passes)
    weight_bytes: int
    linear_bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Report:
    model: str
    weight_bytes_before: int
    linear_bytes_before: int
    passes: list[PassRecord] = field(default_factory=list)
    verify: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    @property
    def weight_bytes_after(self) -> int:
        return self.passes[-1].weight_bytes if self.passes else self.weight_bytes_before

    @property
    def linear_bytes_after(self) -> int:
        return self.passes[-1].linear_bytes if self.passes else self.linear_bytes_before

    def to_dict(self) -> dict:
        return {"model": self.model, "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after,
                "linear_bytes_before": self.linear_bytes_before,
                "linear_bytes_after": self.linear_bytes_after,
                "verify": self.verify, "calibration": self.calibration,
                "passes": [p.to_dict() for p in self.passes]}


class PassManager:
    def __init__(self, passes: Sequence[Pass], verify: VerifyConfig | None = None,
                 on_pass: Callable[[int, int, str], None] | None = None):
        self.passes = list(passes)
        self.verify = verify or VerifyConfig()
        self.on_pass = on_pass  # progress hook: (index, total, pass name)

    def run(self, gm: fx.GraphModule, ctx: CompileContext, model_name: str = "") -> tuple[fx.GraphModule, Report]:
        report = Report(model=model_name, weight_bytes_before=ir.weight_bytes(gm),
                        linear_bytes_before=ir.linear_weight_bytes(gm),
                        verify=self.verify.to_dict(),
                        calibration={"source": ctx.calib_source, **ctx.config.to_dict()})
        base: ProbeRun | None = probe(gm, ctx.probe_ids) if self.verify.enabled else None
        prev = base
        done: list[str] = []
        for i, p in enumerate(self.passes):
            if self.on_pass:
                self.on_pass(i, len(self.passes), p.name)
            t0 = time.perf_counter()
            kv_before = kv_specs(gm)
            try:
                p.check(gm)
                result = p.run(gm, ctx)
            except MCompError:
                raise
            except Exception as e:  # a crash inside a pass: name it and its predecessors
                raise PassError(f"failed: {type(e).__name__}: {e}", pass_name=p.name,
                                previous=tuple(done)) from e
            gm = result.gm
            seconds = time.perf_counter() - t0
            d = d_total = None
            if self.verify.enabled:
                prev, d = verify_pass(gm, prev, ctx.probe_ids, pass_name=p.name,
                                      previous=tuple(done), exact=p.exact,
                                      exact_atol=self.verify.exact_atol,
                                      max_kld=self.verify.max_kld)
                d_total = drift(base.logits, prev.logits)
            kv_d = None
            if self.verify.enabled and self.verify.kv and kv_specs(gm) != kv_before:
                kv_d = verify_kv(gm, ctx.calib_ids, ctx.bos_id, pass_name=p.name,
                                 previous=tuple(done), prefill=self.verify.kv_prefill,
                                 exact_atol=self.verify.exact_atol)
            log.info("pass %s: %.2fs %s", p.name, seconds, result.stats)
            report.passes.append(PassRecord(
                name=p.name, version=p.version, config=p.config.to_dict(), exact=p.exact,
                seconds=seconds, stats=result.stats, drift=d, drift_total=d_total, kv_drift=kv_d,
                weight_bytes=ir.weight_bytes(gm), linear_bytes=ir.linear_weight_bytes(gm)))
            done.append(p.name)
        if self.on_pass:
            self.on_pass(len(self.passes), len(self.passes), "done")
        return gm, report
