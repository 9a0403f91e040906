
import torch

from mcomp.compiler import ir
from mcomp.compiler.manager import PassManager
from mcomp.passes.fuse_gate_up import FuseGateUp
from tests.helpers import tiny_ctx, tiny_gm, tiny_spec


def test_fuse_gate_up_is_exact():
    gm = tiny_gm()
    ids = torch.randint(0, 128, (2, 20))
    pos = torch.arange(20).expand(2, -1)
    ref = gm(ids, pos)
    gm, rep = PassManager([FuseGateUp()]).run(gm, tiny_ctx())
    assert rep.passes[0].stats["fused_layers"] == 2
    assert len(list(ir.nodes_by_role(gm, "gate_up_proj"))) == 2
    torch.testing.assert_close(gm(ids, pos), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ir.build(ir.get_spec(gm), gm.state_dict())(ids, pos), ref, rtol=0, atol=1e-5)


def test_fuse_gate_up_on_plain_mlp_is_a_noop():
    spec = tiny_spec(gated_mlp=False, act="gelu_tanh")
    gm, rep = PassManager([FuseGateUp()]).run(tiny_gm(spec), tiny_ctx())
    assert rep.passes[0].stats["fused_layers"] == 0
