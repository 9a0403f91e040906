"""JIT-built C++ kernels: one place that builds an extension once per process, remembers why it
could not be built, and lets the caller fall back to its pure-torch reference.

`torch.utils.cpp_extension` caches the build in torch's extension dir (keyed by source and flags),
so only the first use on a machine compiles (~30 s). Flags: -O3 -march=native (the kernels have
AVX-512 paths and generic fallbacks), OpenMP for at::parallel_for.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from ...errors import KernelUnavailable

log = logging.getLogger("mcomp.kernels")

CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


class JitExtension:
    """`what` names the kernel in messages; `disable_env` turns it off; `build(cpp_extension)`
    returns the compiled module; `fallback` names what runs instead (said once, in the warning)."""

    def __init__(self, what: str, disable_env: str, build: Callable,
                 fallback: str = "the reference attention"):
        self.what, self.disable_env, self.build, self.fallback = what, disable_env, build, fallback
        self.module = None
        self.error: str | None = None

    def load(self):
        """The compiled extension; KernelUnavailable with the reason when it cannot be built."""
        if self.module is not None:
            return self.module
        if os.environ.get(self.disable_env):
            raise KernelUnavailable(f"{self.what} disabled by {self.disable_env}")
        if self.error is not None:
            raise KernelUnavailable(self.error)
        try:
            from torch.utils import cpp_extension
            if not cpp_extension.is_ninja_available():
                raise RuntimeError("ninja is not installed (pip install ninja)")
            self.module = self.build(cpp_extension)
        except Exception as e:  # compiler, ninja, headers: report once and fall back
            self.error = f"{self.what} unavailable: {type(e).__name__}: {str(e)[:300]}"
            log.warning("%s; using %s", self.error, self.fallback)
            raise KernelUnavailable(self.error) from None
        return self.module

    def available(self) -> bool:
        try:
            self.load()
            return True
        except KernelUnavailable:
            return False
