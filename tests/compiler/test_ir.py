import dataclasses

import torch

from mcomp.codegen import load_artifact, save_artifact
from mcomp.compiler import ir
from tests.helpers import tiny_gm, tiny_spec


def test_derived_buffers_stay_out_of_the_state_dict(tmp_path):
    """gemma-style embedding scaling: the scale is a derived buffer, not a weight."""
    spec = dataclasses.replace(tiny_spec(), embed_scale=8.0)
    gm = tiny_gm(spec)
    assert "embed_scale" not in gm.state_dict()
    assert not any("inv_freq" in k for k in gm.state_dict())
    ids = torch.randint(0, 128, (1, 12))
    pos = torch.arange(12)[None]
    rebuilt = ir.build(spec, gm.state_dict())           # what structural passes do
    torch.testing.assert_close(rebuilt(ids, pos), gm(ids, pos), rtol=0, atol=0)
    save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="test")
    torch.testing.assert_close(load_artifact(tmp_path / "a").gm(ids, pos), gm(ids, pos), rtol=0, atol=0)


def test_nodes_carry_roles_layers_and_layouts():
    gm = tiny_gm()
    q = [n for n in ir.nodes_by_role(gm, "q_proj")]
    assert [n.meta["mcomp"].layer for n in q] == [0, 1]
    assert q[0].meta["mcomp"].get("heads") == 4 and q[0].meta["mcomp"].get("head_dim") == 16
    assert len(list(ir.nodes_by_role(gm, "attn"))) == 2
    assert len(list(ir.nodes_by_role(gm, "rope_apply"))) == 4
