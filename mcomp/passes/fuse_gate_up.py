"""fuse_gate_up: gate_proj, up_proj → one gate_up_proj + split. Exact.
Plain (non-gated) MLPs have nothing to fuse; the pass then reports fused_layers = 0."""
from __future__ import annotations

from dataclasses import dataclass

from ..compiler.passes import Pass, PassConfig, PassResult, register_pass
from .fusion import fuse_siblings


@dataclass(frozen=True)
class FuseGateUpConfig(PassConfig):
    pass


@register_pass
class FuseGateUp(Pass):
    name = "fuse_gate_up"
    Config = FuseGateUpConfig
    exact = True
    stage = "fuse"

    def run(self, gm, ctx) -> PassResult:
        stats = fuse_siblings(gm, ("gate_proj", "up_proj"), "gate_up_proj", "gate_up_proj",
                              "fused_gate_up")
        return PassResult(gm, stats)
