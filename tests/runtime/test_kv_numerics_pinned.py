"""Dense and KIVI numerics are unchanged by the KV-seam refactor (issue 11), bit for bit.

tests/fixtures/kv_numerics.json was written by tests/fixtures/kv_numerics.py from the code at
commit 0d9ab93 (before the seam); this test recomputes the same quantities with today's code on
the real SmolLM2 and Gemma 3 checkpoints and requires equality: streaming perplexity, KL and
top-1 in both evaluation modes, and the sha256 of the fp32 logits of 8 decode steps. Slow.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import require_model
from tests.fixtures import kv_numerics as kn

pytestmark = pytest.mark.slow

PINNED = json.loads(kn.PATH.read_text())


@pytest.mark.parametrize("model", kn.MODELS)
@pytest.mark.parametrize("scheme", kn.SCHEMES)
def test_numerics_equal_the_pre_seam_values(model, scheme):
    require_model(model)
    want = PINNED["results"][f"{model}/{scheme}"]
    got = kn.measure(model, scheme)
    for mode in ("stream", "prefill"):
        assert got[mode] == want[mode], (mode, got[mode], want[mode])
    g, w = got["decode"], want["decode"]
    assert g["top5_ids"] == w["top5_ids"]
    assert g["sha256"] == w["sha256"], (
        f"decode logits differ: sum {g['sum']!r} vs {w['sum']!r}, sumsq {g['sumsq']!r} vs "
        f"{w['sumsq']!r}")
