"""Fast CPU kernels for QuantLinear built on PyTorch's own int4 / int8 weight-only matmul ops.

Both run with bf16 activations: x is rounded to bf16 (relative error ≤ 2^-8 per element), the op
accumulates internally and returns bf16, and the result goes back to x's dtype with the bias
added in fp32. Measured on this project's 2-core AVX-512 machine (M=1, 1536×576): fp32 F.linear
≈ 73–107 µs, int4 bf16 ≈ 35 µs, int8 bf16 ≈ 29 µs; with fp32 activations the same ops take
430–780 µs, which is why the cast is part of the kernel.

int4_tinygemm_bf16 — `aten._weight_int4pack_mm_for_cpu`
    bits == 4, symmetric or asymmetric (fractional zeros too). The op dequantizes
    w = (q − 8)·scale + zero_f per (row, op group), so for our w = (q − z)·s we pass
    zero_f = (8 − z)·s. Op constraints (measured, torch 2.13): op group ∈ {32, 64, 128, 256},
    K a multiple of the op group, N a multiple of 16. Our scheme's group g maps onto an op group
    `go` that divides g (a scheme group is then several op groups sharing one scale/zero), so any
    g that is a multiple of 32 fits (g = 512 → go = 256, g = 96 → go = 32); a layer with a single
    group (per-channel, or g ≥ K) can use any go. K is padded up to a multiple of go (padded
    codes 8, padded x columns 0 at run time, so they contribute nothing) and N up to a multiple
    of 16 (padded rows have scale 0 and are sliced off). Group sizes that are not a multiple of
    32 (8, 16, 24, 40, ...) use the reference kernel.

int8_bf16 — `aten._weight_int8pack_mm`
    bits == 8 with one group per row (group_size == 0 or ≥ K). The op computes
    y_n = s_n · Σ_k x_k · w_nk with int8 w, so we store w = q − 128 and, for asymmetric zeros,
    add the exact zero-point correction y_n += s_n·(128 − z_n)·Σ_k x_k in fp32.
    Measured op constraint: K must be a multiple of 16 (other K give wrong results or crash),
    so K is padded to a multiple of 32 with zero weights / zero activations.
    Grouped int8 (several scales per row) has no matching op and uses the reference kernel.

Prepared layouts (packed int4 tiles, int8 weights, bf16 scales) are built lazily at the first
call and cached on the module, one per kernel (int_dot.py's decode layout and this module's GEMM
layout are both live when prefill and decode alternate), as a plain attribute (`_cpu_int_cache`),
never as a buffer: they
are a function of the stored tensors, must not enter the state_dict or the artifact, and are
rebuilt whenever a stored tensor is replaced or modified in place (checked by tensor identity and
version counter; inference tensors have no version counter, so for a module built under
torch.inference_mode only replacement is detected: call clear_prepared after modifying one in
place). If an op is missing from the torch build or fails a one-time
self test, its predicate is False and the selector falls back to the reference kernel.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from . import LinearKernel, register_linear_kernel

log = logging.getLogger("mcomp.kernels")

INT4_OP_GROUPS = (256, 128, 64, 32)   # group sizes _weight_int4pack_mm_for_cpu accepts
INT4_N_MULTIPLE = 16                  # _convert_weight_to_int4pack_for_cpu: N % 16 == 0
INT8_K_MULTIPLE = 32                  # _weight_int8pack_mm is wrong for K % 16 != 0; pad to 32
_CACHE_ATTR = "_cpu_int_cache"


# --------------------------------------------------------------------------- helpers
def _op(name: str):
    """torch.ops.aten.<name>, or None when this build does not have it."""
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Prepared:
    """A layer's operands in the op's layout, plus what they were built from."""

    __slots__ = ("kernel", "src", "versions", "K", "Kp", "N", "Np", "tensors")

    def __init__(self, kernel: str, K: int, Kp: int, N: int, Np: int, tensors: tuple):
        self.kernel = kernel
        self.K, self.Kp = K, Kp          # logical / padded in_features (the op sees Kp)
        self.N, self.Np = N, Np          # logical / padded out_features (the op returns Np)
        self.tensors = tensors           # kernel-specific prepared tensors
        self.src: tuple = ()
        self.versions: tuple = ()


def _versions(ts: tuple) -> tuple:
    # inference tensors (created under torch.inference_mode, e.g. by a loader) have no version
    # counter: for them only replacement of the tensor is detected
    return tuple(None if t is None or t.is_inference() else t._version for t in ts)


def _prepared(m, kernel: str, build) -> _Prepared:
    """The cached prepared layout, rebuilt when a stored tensor was replaced or changed in place.
    The cache holds references to the source tensors, so identity checks cannot be fooled by a
    freed tensor's id or address being reused."""
    b = m._buffers
    src = (b["qweight"], b["scales"], b.get("zeros"))
    cache = m.__dict__.get(_CACHE_ATTR)
    if cache is None:   # one layout per kernel: decode (int_dot) and prefill (ATen) alternate
        cache = {}
        object.__setattr__(m, _CACHE_ATTR, cache)   # plain attribute: never a buffer / state_dict entry
    p = cache.get(kernel)
    if (p is None or p.src[0] is not src[0] or p.src[1] is not src[1]
            or p.src[2] is not src[2] or p.versions != _versions(src)):
        p = build(m)
        p.src, p.versions = src, _versions(src)
        cache[kernel] = p
    return p


def clear_prepared(m) -> None:
    """Drop a module's prepared layout (it is rebuilt at the next call)."""
    m.__dict__.pop(_CACHE_ATTR, None)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, lead: tuple, dtype: torch.dtype) -> torch.Tensor:
    """(M, N) op output → + bias in fp32 (bf16 + fp32 promotes: one op) → x's shape and dtype."""
    if bias is not None:
        y = torch.add(y, bias)
    return y.to(dtype).reshape(*lead, y.shape[-1])


def _on_cpu(m) -> bool:
    return m.qweight.device.type == "cpu"


# --------------------------------------------------------------------------- int4
def _int4_op_group(m) -> int | None:
    """The op group size for this layer, or None when the op cannot express its grouping."""
    K = m.in_features
    G = m.scheme.groups(K)
    g = m.scheme.effective_group(K)
    if G == 1:   # one scale per row: any op group works; least padding, then the largest group
        return min(INT4_OP_GROUPS, key=lambda go: (_round_up(K, go), -go))
    for go in INT4_OP_GROUPS:
        if g % go == 0:
            return go
    return None


def _self_test(label: str, compute) -> bool:
    """One-time check that an op computes what this module assumes: `compute()` returns
    (op result, fp32 reference) on a small random case. Any exception or mismatch → False,
    and the selector then falls back to the reference kernel."""
    try:
        y, ref = compute()
        ok = bool(((y.float() - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-3).item())
    except Exception as e:  # op present but unusable on this CPU/build
        log.debug("%s CPU op self test raised %s: %s", label, type(e).__name__, e)
        return False
    if not ok:
        log.debug("%s CPU op self test gave wrong results; using the reference kernel", label)
    return ok


@functools.lru_cache(maxsize=None)
def _int4_available() -> bool:
    conv, mm = _op("_convert_weight_to_int4pack_for_cpu"), _op("_weight_int4pack_mm_for_cpu")
    if conv is None or mm is None:
        log.debug("int4 CPU ops missing from this torch build")
        return False

    def compute():
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.int32)
        sz = torch.rand(2, 16, 2, generator=g).bfloat16()
        x = torch.randn(2, 64, generator=g).bfloat16()
        s = sz[..., 0].float().t().repeat_interleave(32, 1)
        z = sz[..., 1].float().t().repeat_interleave(32, 1)
        return mm(x, conv(q, 2), 32, sz), x.float() @ ((q.float() - 8) * s + z).t()

    return _self_test("int4", compute)


def _int4_applies(m) -> bool:
    return (m.scheme.bits == 4 and _on_cpu(m) and _int4_op_group(m) is not None
            and _int4_available())


def _int4_build(m) -> _Prepared:
    N, K = m.out_features, m.in_features
    go = _int4_op_group(m)
    g = m.scheme.effective_group(K)
    Kp, Np = _round_up(K, go), _round_up(N, INT4_N_MULTIPLE)
    q = m.codes().to(torch.int32)                                            # (N, K)
    q = F.pad(q, (0, Kp - K, 0, Np - N), value=8)                            # (Np, Kp)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    s, z = m.scales.float(), m.zero_points()                                 # (N, G)
    G = s.shape[1]
    gidx = torch.clamp(torch.arange(Kp // go) * go // g, max=G - 1)          # op group → our group
    s_op = s[:, gidx]                                                        # (N, Kp/go)
    zf_op = ((8.0 - z) * s)[:, gidx]                                         # zero_f = (8 − z)·s
    sz = torch.stack([s_op, zf_op], -1)                                      # (N, Kp/go, 2)
    sz = F.pad(sz, (0, 0, 0, 0, 0, Np - N))                                  # padded rows: 0
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)                  # (Kp/go, Np, 2)
    log.debug("int4_tinygemm_bf16: prepared %dx%d (%s) as op group %d, padded to %dx%d",
              N, K, m.scheme.label(), go, Np, Kp)
    return _Prepared("int4", K, Kp, N, Np, (packed, sz, go))


def _bf16_padded(x: torch.Tensor, p: _Prepared) -> torch.Tensor:
    """x (..., K) → (M, Kp) bf16, zero-padded to the op's K: the shared prologue of both ops."""
    xb = x.reshape(-1, p.K).to(torch.bfloat16)                               # (M, K)
    return F.pad(xb, (0, p.Kp - p.K)) if p.Kp != p.K else xb


def int4_tinygemm_bf16(m, x: torch.Tensor) -> torch.Tensor:
    p = _prepared(m, "int4", _int4_build)
    packed, sz, go = p.tensors
    lead = x.shape[:-1]
    xb = _bf16_padded(x, p)                                                  # (M, Kp)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, go, sz)  # (M, Np) bf16
    if p.Np != p.N:
        y = y[:, : p.N]
    return _finish(y, m.bias, lead, x.dtype)


# --------------------------------------------------------------------------- int8
@functools.lru_cache(maxsize=None)
def _int8_available() -> bool:
    mm = _op("_weight_int8pack_mm")
    if mm is None:
        log.debug("int8 CPU op missing from this torch build")
        return False

    def compute():
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-128, 128, (8, 64), generator=g, dtype=torch.int8)
        s = (torch.rand(8, generator=g) + 0.5).bfloat16()
        x = torch.randn(2, 64, generator=g).bfloat16()
        return mm(x, w, s), (x.float() @ w.float().t()) * s.float()

    return _self_test("int8", compute)


def _int8_applies(m) -> bool:
    return (m.scheme.bits == 8 and m.scheme.groups(m.in_features) == 1 and _on_cpu(m)
            and _int8_available())


def _int8_build(m) -> _Prepared:
    N, K = m.out_features, m.in_features
    Kp = _round_up(K, INT8_K_MULTIPLE)
    w = (m.codes().to(torch.int16) - 128).to(torch.int8)                     # (N, K), exact
    w = F.pad(w, (0, Kp - K)).contiguous()                                   # (N, Kp)
    s = m.scales.float()[:, 0]                                               # (N,)
    corr = None
    if m.zeros is not None:
        c = s * (128.0 - m.zeros.float()[:, 0])                              # (N,) s·(128 − z)
        if bool((c != 0).any()):
            corr = c
    log.debug("int8_bf16: prepared %dx%d (%s), K padded to %d, zero correction %s",
              N, K, m.scheme.label(), Kp, corr is not None)
    return _Prepared("int8", K, Kp, N, N, (w, s.to(torch.bfloat16), corr))


def int8_bf16(m, x: torch.Tensor) -> torch.Tensor:
    p = _prepared(m, "int8", _int8_build)
    w, s, corr = p.tensors
    lead = x.shape[:-1]
    xb = _bf16_padded(x, p)                                                  # (M, Kp)
    y = torch.ops.aten._weight_int8pack_mm(xb.contiguous(), w, s)            # (M, N) bf16
    if corr is not None:  # y_n += s_n (128 − z_n) Σ_k x̂_k in fp32, on the same bf16-rounded x
        y = torch.addr(y.float(), xb.sum(-1, dtype=torch.float32), corr)
    return _finish(y, m.bias, lead, x.dtype)


INT4_TINYGEMM_BF16 = register_linear_kernel(
    LinearKernel("int4_tinygemm_bf16", _int4_applies, int4_tinygemm_bf16))
INT8_BF16 = register_linear_kernel(LinearKernel("int8_bf16", _int8_applies, int8_bf16))


def prepared_operands(m) -> tuple[str, _Prepared] | None:
    """("int_dot" | "int4" | "int8", the prepared layout) of the fast kernel that runs `m`, or
    None when `m` runs the reference kernel: lets another executor (runtime/fastdecode.py) run the
    same kernel on the same operands, with results bit-identical to the graph's."""
    from . import _FORCE_REFERENCE, select_linear_kernel
    from .int_dot import INT_DOT, _build as _int_dot_build
    if _FORCE_REFERENCE:
        return None
    k = m._kernel or select_linear_kernel(m)
    if k is INT_DOT:
        return "int_dot", _prepared(m, "int_dot", _int_dot_build)
    if k is INT4_TINYGEMM_BF16:
        return "int4", _prepared(m, "int4", _int4_build)
    if k is INT8_BF16:
        return "int8", _prepared(m, "int8", _int8_build)
    return None
