"""Real SmolLM2-135M with KIVI KV caches, measured with the compression in the loop.
Slow: loads the checkpoint and decodes token by token."""
from __future__ import annotations

import pytest

from mcomp import data
from mcomp.runtime.session import Session
from tests.conftest import kv_session

pytestmark = pytest.mark.slow


def session(kv: str) -> Session:
    return kv_session(kv)


@pytest.mark.parametrize("kv,max_increase", [("kivi4", 0.01), ("kivi2", 0.10)])
def test_smollm2_kivi_perplexity_budget(kv, max_increase):
    r = session(kv).streaming_perplexity(data.evaluation_text(), ctx=512, max_tokens=2044,
                                         mode="prefill", batch_size=2)
    assert r["tokens_scored"] == 2044
    assert r["ppl"] <= r["base_ppl"] * (1 + max_increase), r


def test_smollm2_stream_equals_quantized_prefill():
    s = session("kivi2")
    a = s.streaming_perplexity(data.evaluation_text(), ctx=512, max_tokens=511, mode="stream")
    b = s.streaming_perplexity(data.evaluation_text(), ctx=512, max_tokens=511, mode="prefill")
    assert a["ppl"] == pytest.approx(b["ppl"], rel=2e-3)
    assert a["kld"] == pytest.approx(b["kld"], rel=0.05, abs=1e-4)
