"""xquant-cl (cross-layer XQuant with the GQA latent): exactness in full precision, the
accumulator's error feedback, anchors, byte accounting, the binary quantizer and bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mcomp.compiler import ir
from mcomp.errors import ConfigError
from mcomp.passes.assign_kv import apply_kv_flag
from mcomp.runtime.kv import bytes_held, parse_kv
from mcomp.runtime.kv.kivi import quantize_minmax
from mcomp.runtime.kv.xquant_cl import quantize_delta
from tests.helpers import tiny_gm, tiny_spec
from tests.runtime.test_xquant import run_cached

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(T=48, seed=0):
    return torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(seed))


def test_full_precision_streaming_equals_no_cache():
    """Residual window longer than the text: nothing is quantized, u-space projection, latent
    basis and folded V must reproduce the no-cache forward."""
    gm = tiny_gm(tiny_spec(n_layers=3))
    apply_kv_flag(gm, "xquant-cl:2:res1000")
    ref, got, _ = run_cached(gm, _ids())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("qk_norm", [False, True])
def test_8bit_close_and_nbytes_match_accounting(qk_norm):
    """(llama-style and qk_norm layers)"""
    spec = tiny_spec(n_layers=3)
    if qk_norm:
        spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, qk_norm=True)
                                                      for l in spec.layers))
    gm = tiny_gm(spec)
    apply_kv_flag(gm, "xquant-cl:8:a8:g8:res8")
    ids = _ids(60)
    ref, got, st = run_cached(gm, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel
    for c in st.caches:
        assert c.n_q > 0
        assert c.nbytes() == bytes_held(c.layer, c.length)


def test_prediction_is_used_consistently(monkeypatch):
    """Mutation: a store that forgets to subtract the accumulator's prediction (while the
    reconstruction still adds it) must be caught by the same tolerance the real cache meets."""
    from mcomp.runtime.kv import xquant_cl
    from mcomp.runtime.kv.xquant import XQuantCache

    def run():
        gm = tiny_gm(tiny_spec(n_layers=4))
        apply_kv_flag(gm, "xquant-cl:8:a8:g8:res8")
        ref, got, _ = run_cached(gm, _ids(60))
        return ((got - ref).norm() / ref.norm()).item()

    good = run()
    monkeypatch.setattr(xquant_cl.XQuantCLCache, "_flush_block", XQuantCache._flush_block)
    bad = run()
    assert good < 0.02 < bad, (good, bad)


def test_anchors_per_layer_and_bytes():
    gm = tiny_gm(tiny_spec(n_layers=4))
    apply_kv_flag(gm, "xquant-cl:2:a4:p2")
    ls = ir.get_spec(gm).layers
    assert [l.kv.params.anchor for l in ls] == [True, False, True, False]
    from mcomp.runtime.kv import bytes_per_token
    r = 2 * ls[0].kv_dim
    assert bytes_per_token(ls[0]) == r * 4 / 8 + 4 * r / 64
    assert bytes_per_token(ls[1]) == r * 2 / 8 + 4 * r / 64


def test_run_must_be_contiguous():
    """A predicted layer whose previous layer is not xquant-cl is an anchor; a chain broken at
    runtime (a layer in between changed kind after assignment) is a one-line error."""
    gm = tiny_gm(tiny_spec(n_layers=3))
    from mcomp.passes.assign_kv import AssignKV, AssignKVConfig
    gm = AssignKV(AssignKVConfig(kv="xquant-cl:2", skip_layers=(1,))).run(gm, None).gm
    ls = ir.get_spec(gm).layers
    assert [l.kv.kind for l in ls] == ["xquant-cl", "dense", "xquant-cl"]
    assert [l.kv.params.anchor for l in (ls[0], ls[2])] == [True, True]
    run_cached(gm, _ids(20))   # two one-layer runs work
    broken = ir.get_spec(gm).with_layer(2, kv=ls[2].kv.__class__(
        "xquant-cl", ls[2].kv.params.__class__(**{**ls[2].kv.params.__dict__, "anchor": False})))
    ir.set_spec(gm, broken)
    with pytest.raises(ConfigError, match="contiguous run"):
        run_cached(gm, _ids(20))


def test_binary_quantizer_is_l2_better_than_minmax_at_one_bit():
    x = torch.randn(4, 128, 32, generator=torch.Generator().manual_seed(1))
    def err(qf):
        q, s, m = qf(x, 1, 1)
        return ((q.float() * s.float() + m.float()) - x).pow(2).mean().sqrt().item()
    e_bin, e_mm = err(quantize_delta), err(quantize_minmax)
    assert e_bin < 0.65 * x.std().item() < e_mm, (e_bin, e_mm)
    q, s, m = quantize_delta(x, 1, 2)           # 2+ bits: the min/max grid
    q2, s2, m2 = quantize_minmax(x, 1, 2)
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(m, m2)


@pytest.mark.parametrize("text, match", [
    ("xquant-cl:3", "bits=3 not supported"),
    ("xquant-cl:2:a1", "anchor bits=1"),
    ("xquant-cl:2:q5", "unknown option"),
    ("xquant-cl", "expected xquant-cl:BITS"),
])
def test_bad_shorthand(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_kv(text)


def test_rank_above_layer():
    gm = tiny_gm(tiny_spec(n_layers=2))
    with pytest.raises(ConfigError, match="exceeds"):
        apply_kv_flag(gm, "xquant-cl:2:r100000")
