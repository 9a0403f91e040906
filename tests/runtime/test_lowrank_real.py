"""Real SmolLM2-135M with the calibrated low-rank / channel-shrunk KV kinds (palu, think, eigen, cskv),
measured with the compression in the loop. Slow: calibrates on the embedded text (palu runs a
Fisher backward pass) and evaluates 1022 tokens in quantize-before-attend mode.

Bounds are about 1.5-2× the values measured in docs/benchmarks.md (palu:0.25 KL 0.079,
palu:0.25:kivi4:s4 0.08, think:0.25 0.171 on Persuasion): a broken factorization, allocation or
channel gather gives KL ≥ 1 (a random-channel ThinK gave 6.2), so they can fail."""
from __future__ import annotations

import math

import pytest

from mcomp import data
from mcomp.runtime import kernels
from mcomp.runtime.kernels import xquant_attention
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


def test_smollm2_eigen_full_rank_is_exact():
    """Bases of rank head_dim are invertible maps: the cache attends exactly (measured KL 5e-8;
    fp32 rounding of the basis round trip) and holds dense fp32's bytes."""
    r = _measure("eigen:64")
    assert r["kv_bytes_per_token"] == 46080, r
    assert r["kld"] < 1e-5 and r["top1_agreement"] == 1.0, r


def test_smollm2_cskv_window_beats_palu_at_equal_factors():
    """CSKV's exact recent window over the same uniform-rank factors as palu:0.5:uniform
    (measured KL 0.265 vs 0.588): what fails if the window branch stops being exact."""
    cskv, palu = _measure("cskv:0.5"), _measure("palu:0.5:uniform")
    assert cskv["kld"] < 0.7 * palu["kld"], (cskv, palu)


@pytest.mark.skipif(not xquant_attention.available(), reason="xquant kernel not built")
@pytest.mark.parametrize("kv", ["eigen:0.1:kivi4:g8:r16:s4", "think:0.4", "cskv:0.25:w16:kivi2:g8:s4"])
def test_smollm2_kernel_decode_agrees_with_reference_and_prefill(kv):
    """Token-by-token decode through the C++ kernel (projected mode for eigen and ThinK, the
    store + exact window merge for cskv) against the pure-torch reference decode and the
    quantize-before-attend forward, on the real model: the same KL to the exact cache. Float
    rounding may flip an occasional quantization code downstream, hence a relative tolerance; a
    wrong kernel is off by far more."""
    s = kv_session(kv)
    text = data.evaluation_text()

    def kl(mode):
        return s.streaming_perplexity(text, ctx=128, max_tokens=257, mode=mode)["kld"]
    fast = kl("stream")
    with kernels.reference_mode():
        ref = kl("stream")
    pre = kl("prefill")
    assert fast > 1e-3                                 # the cache really compresses
    assert math.isclose(fast, ref, rel_tol=0.02), (fast, ref)
    assert math.isclose(fast, pre, rel_tol=0.05), (fast, pre)
