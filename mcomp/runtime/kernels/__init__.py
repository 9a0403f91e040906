"""Kernel selection for quantized linears.

Every stored format has the pure-torch reference kernel (dequantize, then F.linear in fp32).
Fast kernels register with a predicate saying which schemes they execute and a priority; the
selector picks the highest-priority kernel that applies (ties: registration order), unless
reference mode is forced (tests compare the two).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("mcomp.kernels")


@dataclass(frozen=True)
class LinearKernel:
    name: str
    applies: Callable[[object], bool]           # (QuantLinear) -> bool
    run: Callable[[object, torch.Tensor], torch.Tensor]
    priority: int = 0                           # higher is tried first


_LINEAR_KERNELS: list[LinearKernel] = []
_FORCE_REFERENCE = False


def register_linear_kernel(kernel: LinearKernel) -> LinearKernel:
    if any(k.name == kernel.name for k in _LINEAR_KERNELS):
        raise ValueError(f"linear kernel '{kernel.name}' is already registered")
    _LINEAR_KERNELS.append(kernel)
    _LINEAR_KERNELS.sort(key=lambda k: -k.priority)   # stable: ties keep registration order
    return kernel


def reference_linear(m, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), m.dequantize(), m.bias).to(x.dtype)


REFERENCE = LinearKernel("reference", lambda m: True, reference_linear)


@contextlib.contextmanager
def reference_mode(enabled: bool = True):
    """Force the reference kernel (for tests and numerical debugging)."""
    global _FORCE_REFERENCE
    old, _FORCE_REFERENCE = _FORCE_REFERENCE, enabled
    try:
        yield
    finally:
        _FORCE_REFERENCE = old


def select_linear_kernel(m) -> LinearKernel:
    for k in _LINEAR_KERNELS:
        if k.applies(m):
            return k
    return REFERENCE


def linear_kernel(m) -> Callable:
    if _FORCE_REFERENCE:
        return REFERENCE.run
    if m._kernel is None:
        m._kernel = select_linear_kernel(m)
        log.debug("kernel %s for %s", m._kernel.name, m.scheme.label())
    return m._kernel.run
from . import cpu_int, int_dot  # noqa: E402,F401  register fast kernels
