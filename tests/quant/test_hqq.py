"""HQQ against the `hqq` package (the reference implementation) on the same matrices.

Oracle: `hqq.core.quantize.Quantizer.quantize(W, nbits, group_size, axis=1)` (its default
proximal solver: p = 0.7, β = 10, κ = 1.01, 20 iterations with early stopping), dequantized in
fp32 as (W_q − zero)·scale. mcomp's mean squared reconstruction error must be within 2% of the
package's (measured: 0.9995–1.017× on these matrices, fp16 scales/zeros included).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from mcomp.compiler import ir
from mcomp.errors import ConfigError
from mcomp.quant import primitives as P
from mcomp.quant.hqq import HQQConfig, QuantizeWeightsHQQ, hqq_params, shrink_lp
from mcomp.quant.linear import QuantLinear
from mcomp.quant.scheme import WeightScheme
from tests.helpers import tiny_ctx, tiny_gm, tiny_spec


def matrix(kind: str, N: int = 128, K: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    if kind == "t3":      # Student t with 3 degrees of freedom: heavy tails, like real weights
        w = w / (torch.randn(3, N, K, generator=g).pow(2).sum(0) / 3).sqrt()
    return w


def reconstruct(w: torch.Tensor, scheme: WeightScheme, **kw) -> torch.Tensor:
    g = scheme.effective_group(w.shape[1])
    s, z = hqq_params(w, scheme, **kw)
    return P.dequantize_codes(P.quantize_codes(w, s, z, scheme.bits, g), s, z, g)


def rtn(w: torch.Tensor, scheme: WeightScheme, integer_zero: bool) -> torch.Tensor:
    g = scheme.effective_group(w.shape[1])
    s, z = P.rtn_params(w, scheme, integer_zero=integer_zero)
    return P.dequantize_codes(P.quantize_codes(w, s, z, scheme.bits, g), s, z, g)


def mse(a, b) -> float:
    return (a - b).pow(2).mean().item()


def _hqq_quantizer():
    if importlib.util.find_spec("hqq") is None:
        msg = "the hqq package is not installed (pip install '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from hqq.core.quantize import Quantizer
    return Quantizer


CASES = [(4, 64), (4, 128), (3, 128), (2, 64)]


@pytest.mark.parametrize("kind", ["gauss", "t3"])
@pytest.mark.parametrize("bits,group", CASES, ids=[f"int{b}-g{g}" for b, g in CASES])
def test_matches_hqq_package(kind, bits, group):
    Quantizer = _hqq_quantizer()
    w = matrix(kind)
    wq, meta = Quantizer.quantize(w.clone(), nbits=bits, group_size=group, axis=1, bitpack=False,
                                  device="cpu")
    ref = ((wq.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)
    ours = reconstruct(w, WeightScheme(bits=bits, group_size=group))      # fp16 scale and zero
    ratio = mse(w, ours) / mse(w, ref)
    assert ratio <= 1.02, f"mcomp HQQ error is {ratio:.4f}× the hqq package's"
    # and the package's solver is doing real work here: it beats min/max RTN (same grid family)
    assert mse(w, ref) < mse(w, rtn(w, WeightScheme(bits=bits, group_size=group), False))


@pytest.mark.parametrize("bits,group", CASES, ids=[f"int{b}-g{g}" for b, g in CASES])
def test_beats_rtn(bits, group):
    """Lower squared error than RTN with the same (float-zero, min/max) start on every matrix,
    and than the RTN pass's default integer-zero grid on Gaussian weights. (On heavy-tailed
    t(3) weights at ≤ 3 bits the integer-zero grid wins — measured 0.72–0.90× HQQ's error —
    because its exact 0 code serves the many near-zero weights; the benchmarks compare on
    real models.)"""
    scheme = WeightScheme(bits=bits, group_size=group)
    for kind in ("gauss", "t3"):
        w = matrix(kind, seed=1)
        h = mse(w, reconstruct(w, scheme))
        assert h < 0.97 * mse(w, rtn(w, scheme, integer_zero=False)), kind
    w = matrix("gauss", seed=1)
    assert mse(w, reconstruct(w, scheme)) < mse(w, rtn(w, scheme, integer_zero=True))


def test_partial_last_group_and_optimize_scale():
    """K = 577 with g128: the 1-column last group must stay exact-ish and finite; refitting the
    scale as well never loses to zero-only in mean |error| by more than noise."""
    w = matrix("t3", N=64, K=577, seed=2)
    scheme = WeightScheme(bits=3, group_size=128)
    a = reconstruct(w, scheme)
    b = reconstruct(w, scheme, optimize_scale=True)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert mse(w, b) < 1.02 * mse(w, a)
    assert mse(w, a) < mse(w, rtn(w, scheme, integer_zero=False))


def test_shrink_operator():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    l1 = shrink_lp(x, beta=10.0, p=1.0)                         # soft threshold at 0.1
    torch.testing.assert_close(l1, torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))
    lp = shrink_lp(x, beta=10.0, p=0.7)
    assert lp[2] == 0 and lp[1] == 0 and lp[3] == 0             # small values vanish
    assert 1.9 < lp[4] < 2.0 and lp[0] == -lp[4]                # large ones shrink less than l1


def test_pass_on_tiny_model_fused_and_unfused():
    from mcomp.passes.fuse_gate_up import FuseGateUp
    from mcomp.passes.fuse_qkv import FuseQKV

    ctx = tiny_ctx()
    for fused in (False, True):
        gm = tiny_gm(tiny_spec())
        if fused:
            gm = FuseGateUp().run(FuseQKV().run(gm, ctx).gm, ctx).gm
        seen = []
        p = QuantizeWeightsHQQ(HQQConfig(bits=4, group_size=32))
        p.on_layer = lambda i, n, stats: seen.append(i)
        res = p.run(gm, ctx)
        lins = [res.gm.get_submodule(n.target) for n in ir.nodes_by_role(res.gm, *ir.DECODER_LINEAR_ROLES)]
        assert lins and all(isinstance(m, QuantLinear) and m.scheme.method == "hqq" for m in lins)
        assert seen == [0, 1]
        assert [l["layer"] for l in res.stats["layers"]] == [0, 1]
        assert all(0 < e < 0.05 for l in res.stats["layers"] for e in l["weight_rel_err"].values())
        pos = torch.arange(32).expand(2, -1)
        assert torch.isfinite(res.gm(ctx.probe_ids, pos)).all()


@pytest.mark.parametrize("kwargs", [dict(symmetric=True), dict(lp_norm=1.5), dict(kappa=1.0),
                                    dict(iters=0), dict(bits=5)])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        HQQConfig(**kwargs)
