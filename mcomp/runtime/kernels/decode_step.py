"""JIT loader of the whole-model decode step (csrc/decode_step.cpp; runtime/fastdecode.py lowers a
model to it). MCOMP_NO_FAST_DECODE=1 disables it; without ninja or a compiler `available()` is
False and generation runs the IR graph, which is also the reference the tests compare against."""
from __future__ import annotations

from pathlib import Path

from .jit import CFLAGS, LDFLAGS, JitExtension

_SRC = Path(__file__).with_name("csrc") / "decode_step.cpp"
_NAME = "mcomp_decode_step_v1"

KERNEL = JitExtension("decode-step engine", "MCOMP_NO_FAST_DECODE", lambda ext: ext.load(
    name=_NAME, sources=[str(_SRC)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False),
    fallback="the IR graph for decode steps")
load, available = KERNEL.load, KERNEL.available
