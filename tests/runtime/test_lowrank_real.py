"""Real SmolLM2-135M with the calibrated low-rank / channel-shrunk KV kinds (palu, think),
measured with the compression in the loop. Slow: calibrates on the embedded text (palu runs a
Fisher backward pass) and evaluates 1022 tokens in quantize-before-attend mode.

Bounds are about 1.5-2× the values measured in docs/benchmarks.md (palu:0.25 KL 0.079,
palu:0.25:kivi4:s4 0.08, think:0.25 0.171 on Persuasion): a broken factorization, allocation or
channel gather gives KL ≥ 1 (a random-channel ThinK gave 6.2), so they can fail."""
from __future__ import annotations

import pytest

from mcomp import data
from tests.conftest import kv_session


def _measure(kv):
    s = kv_session(kv)
    return s.streaming_perplexity(data.evaluation_text(), ctx=512, max_tokens=1023, mode="prefill")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kv,max_kld", [("palu:0.25:kivi4:s4", 0.15), ("think:0.25", 0.3)])
def test_smollm2_lowrank_quality(kv, max_kld):
    r = _measure(kv)
    assert r["tokens_scored"] == 1022
    assert r["kld"] <= max_kld, r
    if kv.startswith("think"):   # fp32 keys lose a quarter of their channels: 7/8 of dense fp32
        assert r["kv_bytes_per_token"] == 46080 * 7 // 8, r
    else:                        # below half a dense fp16 cache (11520 B/token)
        assert r["kv_bytes_per_token"] < 11520 / 2, r


def test_smollm2_palu_kivi2_beats_kivi2_at_fewer_bytes():
    """The issue's claim, measured against its oracle in the same test: a low-rank + 2-bit
    latent (palu:0.1:kivi2:s4, principal-component latent scaling) has lower KL than KIVI-2 on
    raw K/V with the same sinks, at fewer bytes per token (measured 0.035 vs 0.052, 3899 vs 4320
    B/token). Palu's whitened latent (:white) is far worse at 2 bits (0.61): that is what fails
    if the latent scaling regresses."""
    palu, kivi = _measure("palu:0.1:kivi2:s4"), _measure("kivi2:s4")
    assert palu["kv_bytes_per_token"] < kivi["kv_bytes_per_token"], (palu, kivi)
    assert palu["kld"] < kivi["kld"], (palu, kivi)
