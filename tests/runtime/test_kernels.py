"""The ATen CPU linear kernels (runtime/kernels/cpu_int.py) against the pure-torch reference kernel.

They are the fallback behind the integer-dot kernel (int_dot.py, tests/runtime/test_int_dot.py),
which every test here switches off so the selector reaches them.

Tolerances. The fast kernels round activations to bf16 (relative error ≤ u = 2^-8 per element),
so the reference is run on the bf16-rounded input x̂ = x.bfloat16().float(); what remains is the
kernels' own bf16 arithmetic (scales, zero terms and output rounded to bf16, fp32 accumulation):

- int4_tinygemm_bf16: |y − y_ref| ≤ 1e-2 · max|y_ref − bias| + 1e-5. Correct kernels measure
  ≤ 5e-3 of that scale; a zero point off by one code gives ≥ 5e-2, a shifted group ≥ 0.17,
  swapped nibbles ≥ 1 — every real layout bug is a multiple of the bound.
- int8_bf16: a 1-code zero-point error is 1/255 of the range, about as small as bf16 noise in
  max-norm, so this kernel gets a tighter, per-element bound derived from its arithmetic: the op
  computes t_n = s_n Σ_k x̂_k (q_nk − 128) with one bf16 rounding of s_n and one of the output,
  the zero-point correction s_n (128 − z_n) Σ x̂ is exact fp32, hence
  |y_n − y_ref,n| ≤ 2u·|t_n| (×1.25 margin) + 1e-4·max|y_ref|. Correct: ≤ 0.7 of the bound;
  zero point + 1 code: ≥ 8× the bound at realistic shapes (576 inputs, 256 outputs).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mcomp.quant import primitives as P
from mcomp.quant.linear import QuantLinear
from mcomp.quant.rtn import quantize_linear
from mcomp.quant.scheme import WeightScheme
from mcomp.runtime import kernels
from mcomp.runtime.kernels import cpu_int

U = 2.0 ** -8            # bf16 unit roundoff
INT4_RTOL = 1e-2
INT8_MARGIN = 1.25
MS = (1, 3, 17, 64)


@pytest.fixture(autouse=True)
def aten_kernels(monkeypatch):
    """Hide the C++ extension from int_dot's predicate: cpu_int's kernels are then selected."""
    from mcomp.runtime.kernels import int_dot
    monkeypatch.setattr(int_dot, "_ext", lambda: None)


def make_layer(N: int, K: int, scheme: WeightScheme, *, bias: bool, seed: int = 0,
               fractional_zeros: bool = False) -> QuantLinear:
    """Random codes / scales / zeros (not RTN: the kernels must hold for any stored values)."""
    g = torch.Generator().manual_seed(seed)
    qmax = 2 ** scheme.bits - 1
    G = scheme.groups(K)
    codes = torch.randint(0, qmax + 1, (N, K), generator=g, dtype=torch.uint8)
    scale = 0.02 * (0.5 + torch.rand(N, G, generator=g))
    zero = torch.rand(N, G, generator=g) * qmax
    zero = zero if fractional_zeros else zero.round()
    b = torch.randn(N, generator=g) if bias else None
    return QuantLinear.from_codes(codes, scale, zero, scheme, bias=b)


def reference(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    with kernels.reference_mode():
        return m(x.bfloat16().float())


def violation(m: QuantLinear, x: torch.Tensor, y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """max |y − y_ref| / tolerance over all elements: ≤ 1 passes (see the module docstring)."""
    y, y_ref = y.float().reshape(-1, m.out_features), y_ref.float().reshape(-1, m.out_features)
    nobias = y_ref - (m.bias if m.bias is not None else 0)
    if m.scheme.bits == 8:
        xb = x.reshape(-1, m.in_features).bfloat16().float()                      # (M, K)
        t = xb @ ((m.codes().float() - 128) * m.scales.float()).t()                # (M, N)
        tol = INT8_MARGIN * 2 * U * t.abs() + 1e-4 * nobias.abs().max() + 1e-6
    else:
        tol = INT4_RTOL * nobias.abs().max() + 1e-5
    return ((y - y_ref).abs() / tol).max().item()


INT4_CASES = [  # (N, K, group_size): partial last groups, op-group mapping, padding of N
    (48, 576, 128),      # SmolLM2 hidden: 5 groups, the last one 64 wide → K padded to 640
    (40, 256, 32),       # N not a multiple of 16 → rows padded to 48
    (16, 200, 64),       # last group 8 wide
    (32, 1536, 256),
    (24, 576, 512),      # g512 → op group 256 (2 op groups share a scale), partial
    (32, 576, 0),        # per channel → op group 64, no padding
    (16, 100, 0),        # per channel, K padded to 128
    (16, 96, 96),        # g96 → op group 32
]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("N,K,group", INT4_CASES)
def test_int4_matches_reference(N, K, group, symmetric):
    for bias in (False, True):
        m = make_layer(N, K, WeightScheme(bits=4, group_size=group, symmetric=symmetric),
                       bias=bias, seed=N + K + group)
        assert kernels.select_linear_kernel(m).name == "int4_tinygemm_bf16"
        for M in MS:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
            y = m(x)
            assert y.shape == (M, N) and y.dtype == torch.float32
            v = violation(m, x, y, reference(m, x))
            assert v <= 1.0, f"N={N} K={K} g={group} M={M} bias={bias}: {v:.3g}× the tolerance"


INT8_CASES = [(256, 576, 0), (48, 100, 0), (17, 13, 0), (16, 1, 0), (40, 300, 512)]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("N,K,group", INT8_CASES)
def test_int8_matches_reference(N, K, group, symmetric):
    for bias in (False, True):
        m = make_layer(N, K, WeightScheme(bits=8, group_size=group, symmetric=symmetric),
                       bias=bias, seed=N + K)
        assert kernels.select_linear_kernel(m).name == "int8_bf16"
        for M in MS:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
            y = m(x)
            assert y.shape == (M, N) and y.dtype == torch.float32
            v = violation(m, x, y, reference(m, x))
            assert v <= 1.0, f"N={N} K={K} M={M} bias={bias}: {v:.3g}× the tolerance"


def test_fractional_zero_points():
    """HQQ-style float zeros: int4 folds them into zero_f, int8 into the fp32 correction."""
    for bits, N, K, group in ((4, 48, 576, 128), (8, 64, 576, 0)):
        m = make_layer(N, K, WeightScheme(bits=bits, group_size=group), bias=True,
                       fractional_zeros=True)
        assert kernels.select_linear_kernel(m).name != "reference"
        x = torch.randn(5, K)
        assert violation(m, x, m(x), reference(m, x)) <= 1.0


@pytest.mark.parametrize("bits,group", [(4, 128), (8, 0)])
def test_leading_shapes_dtypes_and_empty_batch(bits, group):
    m = make_layer(32, 576, WeightScheme(bits=bits, group_size=group), bias=True)
    x = torch.randn(2, 5, 576)                                                  # (B, T, K)
    y = m(x)
    assert y.shape == (2, 5, 32)
    assert violation(m, x, y, reference(m, x)) <= 1.0
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 5, 32)
    assert m(torch.randn(0, 576)).shape == (0, 32)


def test_bug_detection_negative():
    """The tolerance is not vacuous: a zero point off by one code (and, for int4, swapped
    nibbles or scales shifted by one group) fails it. The corruption is applied in place after
    the first call, so this also proves the prepared layout is rebuilt when the stored tensors
    change (a stale cache would keep passing)."""
    x = torch.randn(17, 576, generator=torch.Generator().manual_seed(0))
    for bits, group, N in ((4, 128, 48), (4, 0, 48), (8, 0, 256)):
        scheme = WeightScheme(bits=bits, group_size=group)
        m = quantize_linear(nn.Linear(576, N), scheme)        # realistic (RTN) zeros and scales
        y_ref = reference(m, x)
        assert violation(m, x, m(x), y_ref) <= 1.0
        m.zeros.add_(1)                                       # in place, after preparation
        assert violation(m, x, m(x), y_ref) > 3.0, f"int{bits} g{group}: zero+1 not detected"
    base = make_layer(48, 576, WeightScheme(bits=4, group_size=128), bias=False)
    y_ref = reference(base, x)
    swapped = copy.deepcopy(base)
    codes = swapped.codes()
    swapped.qweight.copy_(P.pack(codes.view(48, -1, 2).flip(-1).reshape(48, 576), 4))
    assert violation(base, x, swapped(x), y_ref) > 3.0, "nibble swap not detected"
    shifted = copy.deepcopy(base)
    shifted.scales.copy_(shifted.scales.roll(1, dims=1))
    assert violation(base, x, shifted(x), y_ref) > 3.0, "group shift not detected"


def test_module_built_under_inference_mode():
    """A loader may create the buffers under torch.inference_mode: no version counters then."""
    with torch.inference_mode():
        for bits, group in ((4, 128), (8, 0)):
            m = make_layer(32, 576, WeightScheme(bits=bits, group_size=group), bias=True)
            x = torch.randn(3, 576)
            assert violation(m, x, m(x), reference(m, x)) <= 1.0
            m.scales = m.scales * 2                      # replaced tensors are still detected
            assert violation(m, x, m(x), reference(m, x)) <= 1.0
            m.scales.mul_(2)                             # in place: no version counter to see it
            cpu_int.clear_prepared(m)                    # ... so the caller says so
            assert violation(m, x, m(x), reference(m, x)) <= 1.0


def test_prepared_layout_stays_out_of_state_dict():
    m = make_layer(32, 576, WeightScheme(bits=4, group_size=128), bias=True)
    keys = set(m.state_dict())
    m(torch.randn(1, 576))
    assert getattr(m, cpu_int._CACHE_ATTR, None) is not None
    assert set(m.state_dict()) == keys == {"qweight", "scales", "zeros", "bias"}
    assert not any(isinstance(v, cpu_int._Prepared) for v in m._buffers.values())


@pytest.mark.parametrize("bits,group,symmetric,K,expected", [
    (4, 128, False, 576, "int4_tinygemm_bf16"),
    (4, 128, True, 576, "int4_tinygemm_bf16"),
    (4, 0, False, 576, "int4_tinygemm_bf16"),
    (4, 16, False, 576, "reference"),         # op groups are 32..256: 16 cannot be expressed
    (4, 40, False, 576, "reference"),
    (3, 128, False, 576, "reference"),
    (2, 64, False, 576, "reference"),
    (8, 0, True, 576, "int8_bf16"),
    (8, 0, False, 576, "int8_bf16"),
    (8, 1024, False, 576, "int8_bf16"),       # one group per row
    (8, 128, False, 576, "reference"),        # grouped int8: no matching op
])
def test_kernel_selection(bits, group, symmetric, K, expected):
    m = make_layer(16, K, WeightScheme(bits=bits, group_size=group, symmetric=symmetric), bias=False)
    assert kernels.select_linear_kernel(m).name == expected
    x = torch.randn(2, K)
    y = m(x)
    assert m._kernel.name == expected
    if expected == "reference":
        with kernels.reference_mode():
            assert torch.equal(y, m(x))
    with kernels.reference_mode():     # forcing the reference overrides the cached choice
        assert kernels.linear_kernel(m) is kernels.REFERENCE.run


def test_missing_op_falls_back(monkeypatch):
    """A torch build without the ops: the predicates say no, the selector picks the reference."""
    _op = cpu_int._op
    monkeypatch.setattr(cpu_int, "_op", lambda name: None)
    cpu_int._int4_available.cache_clear()
    cpu_int._int8_available.cache_clear()
    try:
        for bits, group in ((4, 128), (8, 0)):
            m = make_layer(16, 64, WeightScheme(bits=bits, group_size=group), bias=False)
            assert kernels.select_linear_kernel(m).name == "reference"
    finally:
        monkeypatch.setattr(cpu_int, "_op", _op)
        cpu_int._int4_available.cache_clear()
        cpu_int._int8_available.cache_clear()
    assert kernels.select_linear_kernel(m).name == "int8_bf16"


def test_quantized_model_fast_vs_reference():
    """End to end on a tiny canonical model: RTN int4 g32 with the fast kernels vs reference."""
    from mcomp.compiler import verify
    from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig
    from tests.helpers import tiny_gm

    gm = tiny_gm()
    gm = QuantizeWeightsRTN(RTNConfig(bits=4, group_size=32, skip_roles=())).run(gm, None).gm
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, -1)
    with torch.inference_mode():
        fast = gm(ids, pos)
        with kernels.reference_mode():
            ref = gm(ids, pos)
    names = {m._kernel.name for m in gm.modules() if isinstance(m, QuantLinear)}
    assert names == {"int4_tinygemm_bf16"}
    d = verify.drift(ref, fast)
    assert d["top1"] >= 0.95 and d["kld"] < 1e-3, d
