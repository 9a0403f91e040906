"""PassManager + verification: a pass that breaks the model is caught and named."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mcomp.compiler import ir
from mcomp.compiler.manager import PassManager, VerifyConfig
from mcomp.compiler.passes import PASSES, Pass, PassConfig, PassResult
from mcomp.errors import ConfigError, PassError
from mcomp.passes.fuse_qkv import FuseQKV
from tests.helpers import tiny_ctx, tiny_gm


@dataclass(frozen=True)
class _Cfg(PassConfig):
    layer: int = 1


class ScaleOInPlace(Pass):
    """Deliberately wrong "exact" pass: scales one layer's o_proj by 1.5."""
    name = "bad_scale_o"
    Config = _Cfg
    exact = True

    def run(self, gm, ctx):
        node = next(n for n in ir.nodes_by_role(gm, "o_proj") if n.meta["mcomp"].layer == self.config.layer)
        with torch.no_grad():
            gm.get_submodule(node.target).weight.mul_(1.5)
        return PassResult(gm, {})


class BreakShape(Pass):
    """Deliberately wrong pass: shrinks o_proj without telling the spec."""
    name = "bad_shape"
    Config = _Cfg

    def run(self, gm, ctx):
        node = next(n for n in ir.nodes_by_role(gm, "o_proj") if n.meta["mcomp"].layer == 0)
        old = gm.get_submodule(node.target)
        ir.replace_module(gm, node.target, torch.nn.Linear(old.in_features, old.out_features - 1, bias=False))
        return PassResult(gm, {})


class Crash(Pass):
    name = "crashes"
    Config = _Cfg

    def run(self, gm, ctx):
        raise RuntimeError("boom")


def test_wrong_exact_pass_is_caught_and_named():
    gm = tiny_gm()
    with pytest.raises(PassError) as ei:
        PassManager([FuseQKV(), ScaleOInPlace()]).run(gm, tiny_ctx())
    e = ei.value
    assert e.pass_name == "bad_scale_o"
    assert e.previous == ("fuse_qkv",)
    assert e.node == "layers_1_o_proj"          # the first node whose output moved
    msg = str(e)
    assert "bad_scale_o" in msg and "fuse_qkv" in msg and "layers_1_o_proj" in msg


def test_structural_break_is_caught():
    with pytest.raises(PassError, match="bad_shape.*invalid IR") as ei:
        PassManager([BreakShape()]).run(tiny_gm(), tiny_ctx())
    assert ei.value.node == "layers_0_o_proj"


def test_crash_inside_pass_names_it():
    with pytest.raises(PassError, match="pass 'crashes' failed: RuntimeError: boom"):
        PassManager([FuseQKV(), Crash()]).run(tiny_gm(), tiny_ctx())


def test_lossy_pass_drift_is_recorded_and_can_be_bounded():
    from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig
    gm, rep = PassManager([QuantizeWeightsRTN(RTNConfig(bits=2, group_size=16))]).run(tiny_gm(), tiny_ctx())
    d = rep.passes[0].drift
    assert d["kld"] > 1e-4 and d["max_abs_logit"] > 0 and rep.passes[0].drift_total == d
    with pytest.raises(PassError, match="allowed KL"):
        PassManager([QuantizeWeightsRTN(RTNConfig(bits=2, group_size=16))],
                    verify=VerifyConfig(max_kld=1e-6)).run(tiny_gm(), tiny_ctx())


def test_verification_off_skips_numerics():
    gm, rep = PassManager([ScaleOInPlace()], verify=VerifyConfig(enabled=False)).run(tiny_gm(), tiny_ctx())
    assert rep.passes[0].drift is None


def test_registry_rejects_duplicates_and_lists_choices():
    with pytest.raises(ValueError):
        PASSES.register("fuse_qkv", FuseQKV)
    with pytest.raises(ConfigError, match="fuse_qkv"):
        PASSES.get("no_such_pass")


def test_pass_config_rejects_unknown_options():
    with pytest.raises(ConfigError, match="unknown option"):
        FuseQKV.from_dict({"nope": 1})
