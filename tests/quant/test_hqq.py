"""HQQ against the `hqq` package (the reference implementation) on the same matrices.

Oracle: `hqq.core.quantize.Quantizer.quantize(W, nbits, group_size, axis=1, round_zero=...)`
(its default proximal solver: p = 0.7, β = 10, 20 iterations with early stopping), dequantized
in fp32 as (W_q − zero)·scale, with the same `round_zero` as mcomp's config (the start zero
rounded to a code: mcomp's default; the package's `BaseQuantizeConfig` sets it at 4 bits).
mcomp's mean squared reconstruction error must be within 2% of the package's (measured:
0.99–1.017× on the synthetic matrices, 1.00–1.01× on real SmolLM2 matrices, fp16 scales/zeros
included).

The real-checkpoint tests (slow) also compare layer *output* error on real inputs: on SmolLM2
a few v_proj input channels carry activations up to ~5000× the median channel's power while
their weights are small, and there a float start zero (0 off the grid) triples the output error
at 3 bits although it lowers the weight MSE — what made HQQ worse than RTN end to end (KL 2.4
vs 1.5 at 3-bit g128) before `round_zero` became the default. Weight-MSE tests alone, the only
oracle here before, could not see it.
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
from tests.conftest import require_model
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


def package(w: torch.Tensor, bits: int, group: int, round_zero: bool) -> torch.Tensor:
    """The hqq package's reconstruction of w (its groups: consecutive `group` weights of the
    flattened matrix, so per-row groups when group divides K)."""
    Quantizer = _hqq_quantizer()
    wq, meta = Quantizer.quantize(w.clone(), nbits=bits, group_size=group, axis=1, bitpack=False,
                                  device="cpu", round_zero=round_zero)
    return ((wq.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)


def start_grid(w: torch.Tensor, scheme: WeightScheme, round_zero: bool) -> torch.Tensor:
    """Reconstruction on the solver's starting grid (min/max, zero rounded or not)."""
    g = scheme.effective_group(w.shape[1])
    s, z = P.rtn_params(w, scheme, integer_zero=False)
    z = z.round() if round_zero else z
    return P.dequantize_codes(P.quantize_codes(w, s, z, scheme.bits, g), s, z, g)


CASES = [(4, 64), (4, 128), (3, 128), (2, 64)]


@pytest.mark.parametrize("round_zero", [False, True], ids=["float-start", "round-zero"])
@pytest.mark.parametrize("kind", ["gauss", "t3"])
@pytest.mark.parametrize("bits,group", CASES, ids=[f"int{b}-g{g}" for b, g in CASES])
def test_matches_hqq_package(kind, bits, group, round_zero):
    w = matrix(kind)
    scheme = WeightScheme(bits=bits, group_size=group)
    ref = package(w, bits, group, round_zero)
    ours = reconstruct(w, scheme, round_zero=round_zero)                  # fp16 scale and zero
    ratio = mse(w, ours) / mse(w, ref)
    assert ratio <= 1.02, f"mcomp HQQ error is {ratio:.4f}× the hqq package's"
    # and the package's solver is doing real work here: it beats its own starting grid
    assert mse(w, ref) < mse(w, start_grid(w, scheme, round_zero))


def test_round_zero_is_the_default():
    cfg = HQQConfig()
    assert cfg.round_zero is True
    assert QuantizeWeightsHQQ.version == 2       # the default changed with round_zero
    w = matrix("t3", N=16, K=256)
    scheme = WeightScheme(bits=3, group_size=128)
    torch.testing.assert_close(reconstruct(w, scheme), reconstruct(w, scheme, round_zero=True))
    assert not torch.equal(reconstruct(w, scheme), reconstruct(w, scheme, round_zero=False))


@pytest.mark.parametrize("bits,group", CASES, ids=[f"int{b}-g{g}" for b, g in CASES])
def test_beats_rtn(bits, group):
    """Lower squared error than RTN on the grid the solver starts from, on every matrix: the
    default (rounded start zero) against the RTN pass's integer-zero grid (measured 0.91–0.975×;
    the float start used to lose to it by 1.33–1.39× on heavy-tailed t(3) weights at ≤ 3 bits,
    where the exact 0 code serves the many near-zero weights), the float start against
    float-zero min/max RTN."""
    scheme = WeightScheme(bits=bits, group_size=group)
    for kind in ("gauss", "t3"):
        w = matrix(kind, seed=1)
        assert mse(w, reconstruct(w, scheme)) < 0.98 * mse(w, rtn(w, scheme, integer_zero=True)), kind
        h = mse(w, reconstruct(w, scheme, round_zero=False))
        assert h < 0.97 * mse(w, rtn(w, scheme, integer_zero=False)), kind


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


# ----------------------------------------------------------------------------- real checkpoint

@pytest.fixture(scope="module")
def smollm2_layers():
    """Real SmolLM2-135M weights (first 512 input columns, so the package's flattened groups of
    128 are per-row groups like mcomp's) and their real inputs: 255 tokens of the calibration
    text through the HF model (BOS position dropped)."""
    require_model("smollm2-135m")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcomp import data
    from mcomp.compiler.frontend import resolve_hf_dir

    d = resolve_hf_dir("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok(data.calibration_text()[:20000], add_special_tokens=False)["input_ids"][:255]
    ids = torch.tensor([[tok.bos_token_id] + ids])                           # (1, 256)
    names = ["12.self_attn.v_proj", "10.mlp.down_proj"]
    xs = {}
    hooks = [hf.model.layers.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, n=n: xs.__setitem__(n, a[0][0, 1:].detach().clone())) for n in names]
    with torch.inference_mode():
        hf(ids)
    for h in hooks:
        h.remove()
    return {n: (hf.model.layers.get_submodule(n).weight.detach().float()[:, :512].clone(),
                xs[n].float()[:, :512].clone()) for n in names}


def out_err(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """Relative layer output error ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² on real inputs X (T, K)."""
    return ((x @ (w - wq).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()


@pytest.mark.slow
@pytest.mark.parametrize("round_zero", [False, True], ids=["float-start", "round-zero"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("name", ["12.self_attn.v_proj", "10.mlp.down_proj"])
def test_real_smollm2_matches_hqq_package(smollm2_layers, name, bits, round_zero):
    """Same real matrix, same setting: weight MSE within 2% of the package's (measured
    1.00–1.01×), layer output error on real inputs within 5% (measured 0.96–1.02×: the
    per-group vs tensor-wide choice of iterate moves it either way)."""
    w, x = smollm2_layers[name]
    scheme = WeightScheme(bits=bits, group_size=128)
    ref = package(w, bits, 128, round_zero)
    ours = reconstruct(w, scheme, round_zero=round_zero)
    assert mse(w, ours) <= 1.02 * mse(w, ref)
    assert out_err(w, ours, x) <= 1.05 * out_err(w, ref, x)


@pytest.mark.slow
def test_real_smollm2_round_zero_keeps_outlier_channels(smollm2_layers):
    """The regression behind HQQ losing to RTN end to end: layer 12's v_proj has input channels
    with activations up to ~5000× the median channel's power and small weights there. From the
    float start zero HQQ's weight MSE is *lower* than integer-zero RTN's (0.94×) but its output
    error 3.2× higher, in mcomp and the package alike; from the rounded start (the default) the
    output error is within 1.2× of RTN's at 3 bits (measured 1.16×) and below it at 4 bits."""
    w, x = smollm2_layers["12.self_attn.v_proj"]
    power = x.pow(2).mean(0)                                                  # (K,)
    top = power.argsort(descending=True)[:4]
    assert power[top[0]] > 1000 * power.median()                              # the outlier channels
    assert w[:, top].abs().mean() < 0.5 * w.abs().median()                    # carry small weights
    s3 = WeightScheme(bits=3, group_size=128)
    rtn3 = rtn(w, s3, integer_zero=True)
    floaty = reconstruct(w, s3, round_zero=False)
    assert mse(w, floaty) < mse(w, rtn3)                                     # MSE cannot see it
    assert out_err(w, floaty, x) > 2 * out_err(w, rtn3, x)
    assert out_err(w, package(w, 3, 128, False), x) > 2 * out_err(w, rtn3, x)  # nor the package
    assert out_err(w, reconstruct(w, s3), x) < 1.2 * out_err(w, rtn3, x)
    s4 = WeightScheme(bits=4, group_size=128)
    assert out_err(w, reconstruct(w, s4), x) < out_err(w, rtn(w, s4, integer_zero=True), x)
