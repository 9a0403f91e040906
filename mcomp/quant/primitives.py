"""Quantize / dequantize / pack / unpack. Pure torch; the oracle for every fast kernel.

Codes are packed little-endian along each row: for bits ∈ {2, 4, 8} value j of a byte holds
bits [j·b, (j+1)·b); 3-bit codes are packed as a little-endian bit stream, 8 codes per 3 bytes.
"""
from __future__ import annotations

import torch

from .scheme import WeightScheme

_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def scale_dtype(scheme: WeightScheme) -> torch.dtype:
    return _DT[scheme.scale_dtype]


def pad_groups(w: torch.Tensor, g: int) -> torch.Tensor:
    """(N, K) → (N, G, g), zero-padding a partial last group."""
    N, K = w.shape
    G = -(-K // g)
    if G * g != K:
        w = torch.nn.functional.pad(w, (0, G * g - K))
    return w.view(N, G, g)


def group_mask(K: int, g: int) -> torch.Tensor:
    """(G, g) bool: which slots of the padded groups are real columns."""
    G = -(-K // g)
    return (torch.arange(G * g) < K).view(G, g)


def rtn_params(w: torch.Tensor, scheme: WeightScheme, clip: float = 1.0,
               integer_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero point per (row, group): each (N, G) fp32.

    Asymmetric, `integer_zero=False`: the grid spans the group's own [min, max] with a float
    zero point, w = (q − z)·s, z = −min/s — the grid of llama.cpp's Q4_1, HQQ and torchao's
    int4 "float zero" layout; it reproduces a Q4_1 block exactly. `integer_zero=True` is the
    GPTQ/AWQ convention (range widened to contain 0, z rounded to an integer code), which the
    RTN pass uses by default because it measured better at g128 (docs/benchmarks.md).
    `clip` < 1 shrinks the range (used by the clipping search)."""
    K = w.shape[1]
    g = scheme.effective_group(K)
    wg = pad_groups(w.float(), g)                          # (N, G, g)
    real = group_mask(K, g)                                 # (G, g)
    qmax = 2 ** scheme.bits - 1
    if scheme.symmetric:
        amax = wg.abs().masked_fill(~real, 0).amax(-1) * clip   # (N, G)
        half = 2 ** (scheme.bits - 1)
        scale = (amax / (half - 1)).clamp(min=1e-10)
        zero = torch.full_like(scale, float(half))
    else:
        big = torch.finfo(torch.float32).max
        mn = wg.masked_fill(~real, big).amin(-1)
        mx = wg.masked_fill(~real, -big).amax(-1)
        if integer_zero:
            mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        mid = (mx + mn) / 2
        mn, mx = mid + (mn - mid) * clip, mid + (mx - mid) * clip   # shrink around the middle
        # a constant group gets a scale from its magnitude so z stays finite in fp16
        scale = torch.maximum((mx - mn) / qmax, mn.abs().maximum(mx.abs()) / qmax).clamp(min=1e-10)
        scale = torch.where(mx - mn > 1e-8 * scale, (mx - mn) / qmax, scale).clamp(min=1e-10)
        zero = -mn / scale
        if integer_zero:
            zero = zero.round().clamp(0, qmax)
    # store at the scale dtype's precision so codes are computed against what will be used
    sd = scale_dtype(scheme)
    return scale.to(sd).float(), zero.to(sd).float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """Codes (N, K) uint8 for given per-group scale/zero (N, G). The group size is explicit: it
    cannot be recovered from G when the last group is partial (K=576, G=5 fits g ∈ [116, 143])."""
    N, K = w.shape
    g = group_size
    G = scale.shape[1]
    wg = pad_groups(w.float(), g)                                        # (N, G, g)
    q = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 2 ** bits - 1)
    return q.view(N, G * g)[:, :K].to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """(N, K) codes → fp32 weights, w = (q − z) · s per group of `group_size` columns."""
    N, K = q.shape
    g = group_size
    G = scale.shape[1]
    qg = pad_groups(q.float(), g)                                        # (N, G, g)
    w = (qg - zero.float()[..., None]) * scale.float()[..., None]
    return w.view(N, G * g)[:, :K]


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) uint8 codes < 2^bits → (N, ceil(K·bits/8)) uint8."""
    N, K = q.shape
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if bits in (2, 4):
        per = 8 // bits
        Kp = -(-K // per) * per
        q = torch.nn.functional.pad(q, (0, Kp - K)).view(N, Kp // per, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (q << shifts).sum(-1).to(torch.uint8)
    if bits == 3:
        Kp = -(-K // 8) * 8
        q = torch.nn.functional.pad(q, (0, Kp - K)).view(N, Kp // 8, 8).to(torch.int32)
        word = (q << (torch.arange(8, dtype=torch.int32) * 3)).sum(-1)    # 24-bit little endian
        b = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], -1).to(torch.uint8)
        return b.view(N, -1)[:, : -(-K * 3 // 8)].contiguous()
    raise ValueError(f"cannot pack {bits}-bit codes")


def unpack(p: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of pack: (N, packed) uint8 → (N, K) uint8 codes."""
    N = p.shape[0]
    if bits == 8:
        return p[:, :K].contiguous()
    if bits in (2, 4):
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        q = (p.to(torch.int32)[..., None] >> shifts) & (2 ** bits - 1)
        return q.view(N, -1)[:, :K].to(torch.uint8)
    if bits == 3:
        n3 = -(-K // 8) * 3
        p = torch.nn.functional.pad(p, (0, n3 - p.shape[1])).view(N, -1, 3).to(torch.int32)
        word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
        q = (word[..., None] >> (torch.arange(8, dtype=torch.int32) * 3)) & 7
        return q.view(N, -1)[:, :K].to(torch.uint8)
    raise ValueError(f"cannot unpack {bits}-bit codes")
