"""fuse_gate_up: gate_proj, up_proj → one gate_up_proj + split. Exact. Gated MLPs only."""
from __future__ import annotations

from dataclasses import dataclass

from ..compiler import ir
from ..compiler.passes import Pass, PassConfig, PassResult, register_pass
from ..errors import PassError
from .fusion import fuse_siblings


@dataclass(frozen=True)
class FuseGateUpConfig(PassConfig):
    pass


@register_pass
class FuseGateUp(Pass):
    name = "fuse_gate_up"
    Config = FuseGateUpConfig
    exact = True

    def check(self, gm) -> None:
        if not ir.get_spec(gm).gated_mlp:
            raise PassError("needs a gated MLP (gate_proj and up_proj)", pass_name=self.name)

    def run(self, gm, ctx) -> PassResult:
        stats = fuse_siblings(gm, ("gate_proj", "up_proj"), "gate_up_proj", "gate_up_proj",
                              "fused_gate_up")
        return PassResult(gm, stats)
