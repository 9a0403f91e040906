"""The integer-dot linear kernel (kernels/int_dot.py, csrc/qdot.h) against its pure-torch
reference, on every ISA path this CPU can run (portable C++, AVX2, AVX-512 VNNI).

The kernel's semantics are exact up to fp32 summation order: activations are rounded to two
int8 digits per 32 (bit-exact with `quantize_activations`, tested), products with the codes are exact int32,
and what remains is O(30) fp32 roundings per output (a block's d·I, the chunk and group sums,
the zero term, the 16-lane reduction). So the tolerance is

    |y − y_ref| ≤ 4e-6 · (|x̂| · (|codes·s| + |z·s|)ᵀ)   (+ 1e-7 for exact zeros)

per element; correct kernels measure ≤ 1e-7 of that scale (a 30–40× margin), and a zero point
off by one code is ≥ 80× the bound (int8, where one code is 1/255 of the range), swapped
nibbles or a shifted group ≥ 100×.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mcomp.quant import primitives as P
from mcomp.quant.rtn import quantize_linear
from mcomp.quant.scheme import WeightScheme
from mcomp.runtime import kernels
from mcomp.runtime.kernels import int_dot

from tests.runtime.test_kernels import make_layer

pytestmark = pytest.mark.skipif(int_dot._ext() is None, reason="C++ extension unavailable")

RTOL = 4e-6
MS = (1, 3, 17, 64)


def isas() -> list[int]:
    return list(range(int_dot._ext().isa() + 1))


def violation(m, x, y, y_ref) -> float:
    xh = int_dot.quantize_activations(x.reshape(-1, m.in_features)).abs().double()
    s = m.scales.double().repeat_interleave(m.scheme.effective_group(m.in_features), 1)
    s = s[:, : m.in_features]
    z = m.zero_points().double().repeat_interleave(m.scheme.effective_group(m.in_features), 1)
    w = m.codes().double() * s + (z[:, : m.in_features] * s).abs()
    tol = RTOL * (xh @ w.t()) + 1e-7
    d = (y.double().reshape(tol.shape) - y_ref.double().reshape(tol.shape)).abs()
    return (d / tol).max().item()


CASES = [  # (bits, N, K, group): partial last groups, K padding, per channel, grouped int8
    (4, 48, 576, 128), (4, 64, 1536, 256), (4, 24, 576, 512), (4, 32, 576, 0), (4, 40, 100, 0),
    (4, 16, 200, 64), (4, 17, 130, 128),
    (8, 64, 576, 0), (8, 17, 13, 0), (8, 33, 300, 128), (8, 16, 1, 0),
]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits,N,K,group", CASES)
def test_matches_reference_on_every_isa(bits, N, K, group, symmetric):
    for bias, frac in ((False, False), (True, True)):
        m = make_layer(N, K, WeightScheme(bits=bits, group_size=group, symmetric=symmetric),
                       bias=bias, seed=N + K + group, fractional_zeros=frac)
        assert kernels.select_linear_kernel(m).name == "int_dot"
        for M in MS:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
            ref = int_dot.reference_int_dot(m, x)
            for isa in isas():
                y = int_dot.int_dot(m, x, isa)
                assert y.shape == (M, N) and y.dtype == torch.float32
                v = violation(m, x, y, ref)
                assert v <= 1.0, f"isa {isa} bits {bits} N={N} K={K} g={group} M={M}: {v:.3g}×"


@pytest.mark.parametrize("sdt", ["float16", "bfloat16", "float32"])
def test_scales_kept_in_the_artifact_dtype_are_widened_exactly(sdt):
    """The prepared layout keeps scales and zero points in the artifact's dtype and the kernel
    widens them per tile: its outputs equal, bit for bit, those from the same operands widened to
    fp32 in torch (z·s included), on every ISA, and stay within the reference's bound."""
    N, K = 37, 576                      # 37 rows: a partial 16-row tile and a partial 4-row group
    for bits, frac in ((4, True), (8, False)):
        m = make_layer(N, K, WeightScheme(bits=bits, group_size=128, scale_dtype=sdt), bias=False,
                       seed=bits, fractional_zeros=frac)
        codes, s, z, g = int_dot._prepared(m, "int_dot", int_dot._build).tensors
        assert s.dtype == z.dtype == getattr(torch, sdt)
        x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
        ref = int_dot.reference_int_dot(m, x)
        for M in (1, 5):
            for isa in isas():
                y = int_dot._ext().qlinear(x[:M], codes, s, z, None, bits, K, g, isa)
                y32 = int_dot._ext().qlinear(x[:M], codes, s.float(), z.float(), None, bits, K, g, isa)
                assert torch.equal(y, y32), f"{sdt} isa {isa} bits {bits} M={M}"
                assert violation(m, x[:M], y, ref[:M]) <= 1.0


def test_activation_rounding_is_bit_exact():
    """The C++ int8 rounding equals the torch reference bit for bit, including all-zero blocks,
    a partial last block, ties and values across many magnitudes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 77, generator=g) * torch.logspace(-6, 6, 6).unsqueeze(1)
    x[2, :40] = 0                                   # an all-zero block (d = 0)
    x[3, :32] = torch.arange(32) - 15.5             # ties at .5 after scaling? round-half-even
    q1, q2, e = int_dot._ext().quantize_act(x)
    n = (q1.float() * 128 + q2.float()).reshape(6, -1, 32)
    xh = (n * e.unsqueeze(-1)).reshape(6, -1)[:, :77]
    assert torch.equal(xh, int_dot.quantize_activations(x))
    assert int(q1.abs().max()) == 127 and int(q2.abs().max()) <= 64
    assert ((xh - x).abs() <= e.repeat_interleave(32, 1)[:, :77] * 0.501 + 1e-30).all()   # x̂ is x to half a step


def test_batch_invariant():
    """Each token is quantized on its own: row i of a batch equals that row alone, bit for bit,
    so prefill logits equal decode-step logits."""
    m = make_layer(48, 576, WeightScheme(bits=4, group_size=128), bias=True)
    x = torch.randn(9, 576)
    y = m(x)
    for i in (0, 4, 8):
        assert torch.equal(y[i : i + 1], m(x[i : i + 1]))


def test_bug_detection_negative():
    """The tolerance is not vacuous: a zero point + 1 (in place after preparation, so a stale
    prepared layout would keep passing), swapped nibbles, scales shifted by a group all fail."""
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
    for bits, group, N in ((4, 128, 48), (4, 0, 48), (8, 0, 64), (8, 128, 64)):
        m = quantize_linear(nn.Linear(576, N), WeightScheme(bits=bits, group_size=group))
        ref = int_dot.reference_int_dot(m, x)
        assert violation(m, x, m(x), ref) <= 1.0
        m.zeros.add_(1)
        assert violation(m, x, m(x), ref) > 10, f"int{bits} g{group}: zero + 1 not detected"
    base = make_layer(48, 576, WeightScheme(bits=4, group_size=128), bias=False)
    ref = int_dot.reference_int_dot(base, x)
    swapped = copy.deepcopy(base)
    swapped.qweight.copy_(P.pack(swapped.codes().view(48, -1, 2).flip(-1).reshape(48, 576), 4))
    assert violation(base, x, swapped(x), ref) > 100
    shifted = copy.deepcopy(base)
    shifted.scales.copy_(shifted.scales.roll(1, dims=1))
    assert violation(base, x, shifted(x), ref) > 100


@pytest.mark.parametrize("bits,group,expected", [
    (4, 128, "int_dot"), (4, 64, "int_dot"), (4, 0, "int_dot"), (4, 512, "int_dot"),
    (4, 32, "int4_tinygemm_bf16"),      # a 64-code chunk would straddle two scales
    (4, 96, "int4_tinygemm_bf16"),
    (8, 0, "int_dot"), (8, 128, "int_dot"),
    (8, 32, "reference"),
    (3, 128, "reference"),
])
def test_selection(bits, group, expected):
    m = make_layer(16, 576, WeightScheme(bits=bits, group_size=group), bias=False)
    assert kernels.select_linear_kernel(m).name == expected


def test_many_rows_go_to_the_aten_gemm():
    """From GEMM_ROWS rows on, a layer the ATen kernels run goes to them (bit-identical to
    calling them); grouped int8, which they cannot run, stays on the integer-dot kernel."""
    from mcomp.runtime.kernels import cpu_int
    x = torch.randn(int_dot.GEMM_ROWS, 576)
    m4 = make_layer(48, 576, WeightScheme(bits=4, group_size=128), bias=True)
    assert torch.equal(m4(x), cpu_int.int4_tinygemm_bf16(m4, x))
    assert torch.equal(m4(x[:-1]), int_dot.int_dot_rows(m4, x[:-1]))
    m8 = make_layer(48, 576, WeightScheme(bits=8, group_size=128), bias=True)
    assert torch.equal(m8(x), int_dot.int_dot_rows(m8, x))


def test_tiny_model_fast_vs_reference():
    """End to end: int4 g64 on the tiny canonical model, integer-dot kernel vs reference."""
    from mcomp.compiler import verify
    from mcomp.quant.linear import QuantLinear
    from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig
    from tests.helpers import tiny_gm

    gm = QuantizeWeightsRTN(RTNConfig(bits=4, group_size=64, skip_roles=())).run(tiny_gm(), None).gm
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(6).expand(2, -1)             # 12 rows: below GEMM_ROWS, so int_dot runs
    with torch.inference_mode():
        fast = gm(ids, pos)
        with kernels.reference_mode():
            ref = gm(ids, pos)
    assert {m._kernel.name for m in gm.modules() if isinstance(m, QuantLinear)} == {"int_dot"}
    d = verify.drift(ref, fast)
    assert d["top1"] >= 0.95 and d["kld"] < 1e-3, d


def test_prefill_and_decode_layouts_are_both_kept():
    """Prefill (ATen layout) and decode (integer-dot layout) alternate in generation: each kernel
    keeps its own prepared operands, so neither is rebuilt at every switch."""
    from mcomp.runtime.kernels import cpu_int
    m = make_layer(48, 576, WeightScheme(bits=4, group_size=128), bias=False)
    m(torch.randn(int_dot.GEMM_ROWS, 576))
    m(torch.randn(1, 576))
    cache = dict(getattr(m, cpu_int._CACHE_ATTR))
    assert set(cache) == {"int4", "int_dot"}
    m(torch.randn(int_dot.GEMM_ROWS, 576))
    m(torch.randn(1, 576))
    assert all(getattr(m, cpu_int._CACHE_ATTR)[k] is v for k, v in cache.items())
