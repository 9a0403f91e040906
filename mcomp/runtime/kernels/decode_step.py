"""JIT loader of the C++ CPU extension: the whole-model decode step (csrc/decode_step.cpp;
runtime/fastdecode.py lowers a model to it) and the integer-dot linears (csrc/qdot.h; int_dot.py
is their graph kernel). MCOMP_NO_CPP_KERNELS=1 disables the extension; without ninja or a compiler
`available()` is False, generation runs the IR graph and linears the ATen kernels (cpu_int.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .jit import CFLAGS, LDFLAGS, JitExtension

_CSRC = Path(__file__).with_name("csrc")
_SRC = _CSRC / "decode_step.cpp"
_DEPS = (_SRC, _CSRC / "qdot.h")


def _name() -> str:
    # torch's build cache tracks the listed sources, not the headers they include: the name
    # carries a hash of both so an edited header is never served a stale build
    h = hashlib.sha256(b"".join(p.read_bytes() for p in _DEPS)).hexdigest()[:10]
    return f"mcomp_cpu_{h}"


KERNEL = JitExtension("C++ CPU kernels", "MCOMP_NO_CPP_KERNELS", lambda ext: ext.load(
    name=_name(), sources=[str(_SRC)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False),
    fallback="the IR graph for decode steps and the ATen kernels for linears")
load, available = KERNEL.load, KERNEL.available
