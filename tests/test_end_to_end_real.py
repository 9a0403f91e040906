"""The main job on the real default model: optimize → artifact → load → generate/eval."""
from __future__ import annotations

import pytest
import torch

import mcomp
from tests.conftest import require_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    require_model("smollm2-135m")
    out = tmp_path_factory.mktemp("e2e") / "smollm2-int4"
    return mcomp.optimize("smollm2-135m", "int4", out=out)


def test_int4_linear_bytes_at_most_30_percent(int4):
    rep = int4.report
    ratio = rep.linear_bytes_after / rep.linear_bytes_before
    assert ratio <= 0.30, ratio
    assert 0.13 < ratio < 0.14        # 4 bits + fp16 scale and zero per 128 = 4.25/32


def test_artifact_runs_and_matches_the_compiled_ir(int4):
    session = mcomp.load(int4.artifact)
    ids = torch.randint(100, 40000, (1, 48))
    pos = torch.arange(48)[None]
    with torch.inference_mode():
        torch.testing.assert_close(session.gm(ids, pos), int4.gm(ids, pos), rtol=0, atol=0)
    text = session.generate("It is a truth universally acknowledged", max_new_tokens=24)[0]
    words = [w for w in text.split() if w.isalpha()]
    assert len(words) >= 5, text


def test_int4_perplexity_is_measured_against_fp32(int4):
    base = mcomp.load("smollm2-135m")
    res = mcomp.load(int4.artifact).compare(base, mcomp.data.evaluation_text(), ctx=512, max_tokens=2044)
    assert res["tokens_scored"] == 4 * 511
    assert res["base_ppl"] < res["ppl"] < 2 * res["base_ppl"]     # damaged but not destroyed
    assert 0 < res["kld"] < 1.0 and res["top1_agreement"] > 0.5
