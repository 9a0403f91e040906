"""xquant on the real SmolLM2-135M, with the compression in the loop. Slow."""
from __future__ import annotations

import pytest

from mcomp import data
from mcomp.runtime.session import Session
from tests.conftest import kv_session

pytestmark = pytest.mark.slow


def session(kv: str) -> Session:
    return kv_session(kv)


def test_xquant2_beats_kivi2_at_equal_bytes():
    """The issue's acceptance, pinned: at the same KV bytes per token (144 B per layer) and the
    same sink option, xquant:2 has lower KL than kivi2 (measured 0.024 vs 0.052, 1022 tokens)."""
    res = {kv: session(kv).streaming_perplexity(data.evaluation_text(), ctx=512, max_tokens=1023,
                                                mode="prefill")
           for kv in ("kivi2:s4", "xquant:2:s4")}
    assert res["kivi2:s4"]["kv_bytes_per_token"] == res["xquant:2:s4"]["kv_bytes_per_token"]
    assert res["xquant:2:s4"]["kld"] < 0.8 * res["kivi2:s4"]["kld"], res


def test_xquant_stream_equals_quantized_prefill():
    s = session("xquant:2:s4")
    a = s.streaming_perplexity(data.evaluation_text(), ctx=256, max_tokens=255, mode="stream")
    b = s.streaming_perplexity(data.evaluation_text(), ctx=256, max_tokens=255, mode="prefill")
    assert a["kld"] > 0
    assert a["ppl"] == pytest.approx(b["ppl"], rel=2e-3)
    assert a["kld"] == pytest.approx(b["kld"], rel=0.05, abs=1e-4)
