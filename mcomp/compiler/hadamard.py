"""Orthonormal Hadamard rotations for KV quantization (QuaRot / RotateKV).

An orthonormal R (R Rᵀ = I) leaves every dot product unchanged, (xR)(yR)ᵀ = x yᵀ, and a
weighted sum commutes with it, Σ p_i (v_i R) = (Σ p_i v_i) R. A Hadamard R also mixes every
channel into every other with equal weight ±1/√n, so one outlier channel of a head is spread
evenly over all channels: the per-token / per-group value ranges that quantization has to
cover shrink, and 2-bit codes lose less. Used by the rotate_v pass (folded into v_proj/o_proj
weights) and by the KIVI cache's online key rotation (KVSpec.k_rotation).

Shared by the compiler (spec validation, passes) and the runtime: it depends on torch only.
"""
from __future__ import annotations

import functools

import torch

from ..errors import ConfigError

#: smallest Hadamard block worth using for a head_dim that is not a power of two (below this
#: the block-diagonal rotation mixes too few channels to spread an outlier)
MIN_BLOCK = 8


def _sylvester(n: int) -> torch.Tensor:
    """Unnormalized Sylvester Hadamard matrix of order n (a power of two), ±1 entries, fp64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_block(n: int) -> int:
    """Order of the Hadamard blocks used for an n-channel head: n itself when n is a power of
    two, else the largest power of two dividing n (n = b·m, m odd: R = I_m ⊗ H_b)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"hadamard rotation: dimension must be a positive integer, got {n}")
    b = n & -n                      # largest power of two dividing n
    if b != n and b < MIN_BLOCK:
        raise ConfigError(f"hadamard rotation: head_dim={n} is not a power of two and its largest "
                          f"power-of-two factor {b} is < {MIN_BLOCK} (too few channels to rotate)")
    return b


@functools.lru_cache(maxsize=16)
def _hadamard64(n: int) -> torch.Tensor:
    b = hadamard_block(n)
    h = _sylvester(b) / b ** 0.5                                   # orthonormal, symmetric
    return h if b == n else torch.block_diag(*[h] * (n // b))      # I_m ⊗ H_b


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) orthonormal rotation: the normalized Sylvester Hadamard matrix H_n/√n for n a power
    of two (symmetric, so also its own inverse), block-diagonal I_m ⊗ H_b/√b for n = b·m with b the
    largest power-of-two factor (ConfigError when b < MIN_BLOCK). Built in float64, then cast."""
    return _hadamard64(n).to(dtype).clone()
