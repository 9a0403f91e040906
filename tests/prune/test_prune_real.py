"""Structured pruning on the real SmolLM2-135M: FLAP against its Wanda-sp baseline, physical
shrinking (weight bytes fall by exactly the removed parameters) and the pruned artifact's round
trip through the runtime. Calibrated on Pride and Prejudice, scored on Persuasion."""
from __future__ import annotations

import pytest
import torch

import mcomp
from mcomp.compiler import ir
from mcomp.prune import shrink
from tests.conftest import require_model

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require_model(MODEL)
    base = mcomp.optimize(MODEL, "fp32")
    out = {"base": base}
    for method in ("flap", "wanda-sp"):
        out[method] = mcomp.optimize(MODEL, "fp32", prune=f"{method}:0.2",
                                     out=tmp_path_factory.mktemp("prune") / method)
    return out


def test_flap_beats_wanda_sp_by_the_issue_margin(runs):
    base = runs["base"].session()
    text = mcomp.data.evaluation_text()
    inc = {}
    for m in ("flap", "wanda-sp"):
        res = runs[m].session().compare(base, text, ctx=512, max_tokens=1022)
        inc[m] = res["ppl"] - res["base_ppl"]
    # full-size run (4088 tokens): +16.4 vs +301.0; the issue asks FLAP ≤ 0.7× Wanda-sp
    assert 0 < inc["flap"] <= 0.7 * inc["wanda-sp"], inc


def test_weight_bytes_fall_by_the_removed_parameters(runs):
    spec0, gm0 = ir.get_spec(runs["base"].gm), runs["base"].gm
    for m in ("flap", "wanda-sp"):
        gm = runs[m].gm
        removed = shrink.non_embedding_params(spec0) - shrink.non_embedding_params(ir.get_spec(gm))
        assert removed / shrink.non_embedding_params(spec0) == pytest.approx(0.2, abs=0.01)
        assert ir.weight_bytes(gm0) - ir.weight_bytes(gm) == 4 * removed   # fp32: 4 B/param


def test_heterogeneous_pruned_artifact_round_trips(runs):
    res = runs["flap"]
    spec = ir.get_spec(res.gm)
    assert len({(l.n_heads, l.ffn_dim) for l in spec.layers}) > 1     # FLAP's adaptive structure
    loaded = mcomp.load(res.artifact)
    ids = torch.randint(100, 40000, (1, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40)[None]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.gm(ids, pos), res.gm(ids, pos), rtol=0, atol=0)
    assert ir.get_spec(loaded.gm) == spec
