"""Integer-dot CPU kernels for int4 and int8 QuantLinear (csrc/qdot.h), the fast path of both the
graph and the C++ decode engine.

Semantics (the reference below, `reference_int_dot`): each row of x is rounded per block of 32 to
two int8 digits (d = max|x_b| / 127, q1 = round(x/d), q2 = round(128 (x/d − q1)): a 15-bit
fixed-point value per block, finer than bf16), then multiplied exactly with the stored codes;
y = x̂ · ((codes − z)·s)ᵀ + bias, with only fp32 summation order differing from the reference.
One digit (llama.cpp's Q8_0 rounding) was measured first and rejected: greedy continuations of
SmolLM2 int4 left the fp32-reference ones within a few tokens on 5 of 6 prompts, where bf16
activations kept 5 of 6 whole. MCOMP_NO_CPP_KERNELS=1 (or no compiler) gives the ATen kernels
(cpu_int.py) back.

Shapes: the kernel is a GEMV at heart. From GEMM_ROWS rows on (prefill windows, evaluation) a
layer that the ATen kernels also run goes to them: their bf16 GEMM is ~1.4× faster there
(measured at 512 rows, 2 threads) and its activation rounding is finer. Decode steps and small
batches (the memory-bound case this kernel exists for) stay here; `mcomp eval --streaming`
measures that path's quality.

Applies to bits 4 and 8 with one group per row or a group width that is a multiple of 64 (no
64-code chunk then straddles two scales); int4 g32 keeps the ATen int4 kernel. The ISA (AVX-512
VNNI, AVX2, portable) is picked at run time inside the extension.

Prepared operands are cached on the module like cpu_int's (same invalidation rules): codes in
qdot.h's layout, scales s (N, G) and zero points z (N, G) in the artifact's scale dtype (the
kernel widens them per tile and forms z·s in fp32).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import LinearKernel, register_linear_kernel
from .cpu_int import _Prepared, _on_cpu, _prepared, _round_up

log = logging.getLogger("mcomp.kernels")

XB = 32      # activations per int8 block
CH = 64      # codes per chunk (qdot.h)
GEMM_ROWS = 16   # from this many rows on, the ATen GEMM kernels (cpu_int.py) run where they apply


def _ext():
    from . import decode_step
    return decode_step.load() if decode_step.available() else None


def group_width(m) -> int | None:
    """The group width the kernel uses (Kp for one group per row), or None if it cannot."""
    K = m.in_features
    if m.scheme.groups(K) == 1:
        return _round_up(K, CH)
    g = m.scheme.effective_group(K)
    return g if g % CH == 0 else None


def _applies(m) -> bool:
    return (m.scheme.bits in (4, 8) and _on_cpu(m) and group_width(m) is not None
            and _ext() is not None)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes → qdot.h's layout: K zero-padded to 64; int4 chunk bytes hold codes j (low
    nibble) and j + 32 (high nibble) of their 64-code chunk."""
    N, K = codes.shape
    c = F.pad(codes.to(torch.uint8), (0, _round_up(K, CH) - K))
    if bits == 8:
        return c.contiguous()
    c = c.reshape(N, -1, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, -1).contiguous()


def _build(m) -> _Prepared:
    N, K = m.out_features, m.in_features
    # scales and zero points stay in the artifact's dtype (exact: zero points are stored in it, or
    # are 2^(bits-1)); the kernel widens them per tile, and a decode step reads half the bytes
    s = m.scales.contiguous()
    z = m.zero_points().to(s.dtype).contiguous()
    codes = pack_codes(m.codes(), m.scheme.bits)
    log.debug("int_dot: prepared %dx%d (%s), group width %d", N, K, m.scheme.label(), group_width(m))
    return _Prepared("int_dot", K, _round_up(K, CH), N, N, (codes, s, z, group_width(m)))


def _aten(m):
    from . import cpu_int
    for k in (cpu_int.INT4_TINYGEMM_BF16, cpu_int.INT8_BF16):
        if k.applies(m):
            return k
    return None


def int_dot(m, x: torch.Tensor, isa: int = -1) -> torch.Tensor:
    if x.numel() >= GEMM_ROWS * m.in_features and isa < 0:
        k = _aten(m)
        if k is not None:
            return k.run(m, x)
    return int_dot_rows(m, x, isa)


def int_dot_rows(m, x: torch.Tensor, isa: int = -1) -> torch.Tensor:
    """The integer-dot kernel at any number of rows (isa: −1 best, or 0/1/2 forced)."""
    p = _prepared(m, "int_dot", _build)
    codes, s, z, g = p.tensors
    lead = x.shape[:-1]
    bias = None if m.bias is None else m.bias.float()
    y = _ext().qlinear(x.reshape(-1, p.K).float(), codes, s, z, bias, m.scheme.bits, p.K, g, isa)
    return y.to(x.dtype).reshape(*lead, p.N)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) → x̂, the kernel's two-digit int8 rounding per block of 32 in pure torch (the
    reference; qdot.h says why two digits): t = x / d, q1 = round(t), q2 = round(128 (t − q1)),
    x̂ = (128 q1 + q2) · d / 128."""
    M, K = x.shape
    xb = F.pad(x.float(), (0, _round_up(K, XB) - K)).reshape(M, -1, XB)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    t = xb * inv
    q1 = torch.round(t).clamp(-127, 127)
    q2 = torch.round((t - q1) * 128)
    return ((q1 * 128 + q2) * (d * (1.0 / 128))).reshape(M, -1)[:, :K]


def reference_int_dot(m, x: torch.Tensor) -> torch.Tensor:
    """The kernel's semantics in fp64: x̂ @ dequantize(W)ᵀ + bias."""
    lead = x.shape[:-1]
    xh = quantize_activations(x.reshape(-1, m.in_features))
    b = None if m.bias is None else m.bias.double()
    y = F.linear(xh.double(), m.dequantize().double(), b)
    return y.to(x.dtype).reshape(*lead, m.out_features)


# ahead of the ATen kernels of cpu_int.py, which stay the fallback (no compiler, int4 g32)
INT_DOT = register_linear_kernel(LinearKernel("int_dot", _applies, int_dot, priority=10))
