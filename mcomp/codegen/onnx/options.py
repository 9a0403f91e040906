"""Options of the onnx emitter (no onnx imports: the CLI and the emitter seam read them)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ExportError


@dataclass(frozen=True)
class ExportOptions:
    """`accuracy_level`: MatMulNBits' compute type (0 = fp32 activations, exact up to summation
    order; 4 = int8-quantized activations, onnxruntime's fast CPU path and the builder's CPU
    default). `max_length`: positions the rotary caches cover (genai's context_length)."""

    accuracy_level: int = 4
    max_length: int = 4096

    def __post_init__(self):
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy level {self.accuracy_level}: choose 0 (fp32), 1, 2, 3 "
                              "or 4 (int8 activations)")
        if self.max_length < 1:
            raise ExportError(f"max length must be >= 1, got {self.max_length}")
