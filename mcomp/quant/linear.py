"""QuantLinear: a packed-weight linear layer, one leaf node in the IR.

State (what the artifact stores): `qweight` (N, packed) uint8, `scales` (N, G), `zeros` (N, G)
unless symmetric, optional `bias` (N,) fp32. Execution goes through the kernel selector in
runtime.kernels: a fast CPU kernel where one fits the scheme, else the pure-torch reference.
"""
from __future__ import annotations

import torch


from ..compiler.model import LeafModule
from . import primitives as P
from .scheme import WeightScheme


class QuantLinear(LeafModule):
    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        G = scheme.groups(in_features)
        sd = P.scale_dtype(scheme)
        self.register_buffer("qweight", torch.zeros(out_features, scheme.packed_cols(in_features),
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=sd))
        if not scheme.symmetric:
            self.register_buffer("zeros", torch.zeros(out_features, G, dtype=sd))
        else:
            self.zeros = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None
        self._kernel = None      # selected lazily; runtime.kernels caches prepared layouts on it

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   scheme: WeightScheme, bias: torch.Tensor | None = None) -> "QuantLinear":
        N, K = codes.shape
        m = cls(K, N, scheme, bias=bias is not None)
        m.qweight.copy_(P.pack(codes, scheme.bits))
        m.scales.copy_(scale.to(m.scales.dtype))
        if m.zeros is not None:
            m.zeros.copy_(zero.to(m.zeros.dtype))
        if bias is not None:
            m.bias.copy_(bias.float())
        return m

    def codes(self) -> torch.Tensor:
        return P.unpack(self.qweight, self.scheme.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        if self.zeros is not None:
            return self.zeros.float()
        return torch.full(self.scales.shape, float(2 ** (self.scheme.bits - 1)))

    def dequantize(self) -> torch.Tensor:
        """(N, K) fp32 weight: the reference semantics of this layer."""
        return P.dequantize_codes(self.codes(), self.scales.float(), self.zero_points(),
                                  self.scheme.effective_group(self.in_features))

    # ------------------------------------------------------------------ execution
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..runtime.kernels import linear_kernel
        return linear_kernel(self)(self, x)

    def _apply(self, fn, recurse=True):
        self._kernel = None  # device/dtype moves invalidate prepared kernel layouts
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.label()}"
