"""dense: full-precision K/V (fp32, bf16 or fp16) in a buffer that grows by doubling.

`--kv dense` (fp32), `dense:bf16`, `dense:fp16`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..kvcache import DTYPES, KVCache
from . import KVChoice, KVCost, KVKind, KVParams, register_kind

_SHORT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class DenseParams(KVParams):
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"kv dense: dtype '{self.dtype}' not in {', '.join(DTYPES)}")

    def label(self) -> str:
        return f"dense-{self.dtype}"


class DenseKVCache(KVCache):
    """Full-precision K/V in a preallocated buffer that grows by doubling (amortized O(1) append)."""

    def __init__(self, layer, batch, binding=None):
        super().__init__(layer, batch, binding)
        self.dtype = DTYPES[layer.kv.params.dtype]
        self.k = self.v = None
        self.k_dim: int | None = None     # stored key width when it is not V's (think)

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        """Room for `need` tokens, growing by doubling; `like` is a V chunk (B, H, T, D)."""
        if need > self.capacity:
            B, H, _, D = like.shape
            self._grow(max(need, 2 * self.capacity, 64), B, H, D)

    def reserve(self, tokens: int) -> None:
        if tokens > self.capacity:
            self._grow(tokens, self.batch, self.layer.n_kv_heads, self.layer.head_dim)

    def _grow(self, new_cap: int, B: int, H: int, D: int) -> None:
        k = torch.empty((B, H, new_cap, self.k_dim or D), dtype=self.dtype)
        v = torch.empty((B, H, new_cap, D), dtype=self.dtype)
        if self.k is not None:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def append(self, k, v):
        T = k.shape[2]
        self._reserve(self.length + T, k)
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return 2 * self.k[:, :, : self.length].numel() * self.k.element_size()

    def attend(self, q, k, v, scale, mask, h=None, positions=None):
        k_all, v_all = self.append(k, v)  # (B, Hkv, S, D)
        return F.scaled_dot_product_attention(
            q, k_all.to(q.dtype), v_all.to(q.dtype), attn_mask=mask, is_causal=mask is None,
            scale=scale, enable_gqa=q.shape[1] != k_all.shape[1])


@register_kind
class Dense(KVKind):
    name = "dense"
    Params = DenseParams
    syntax = "dense[:fp32|:bf16|:fp16]"

    def parse(self, arg, options, text):
        if arg or len(options) > 1 or (options and options[0] not in _SHORT):
            raise ConfigError(f"--kv '{text}': dense takes one optional dtype: "
                              f"{', '.join(_SHORT)}")
        from ...compiler.spec import KVSpec
        return KVChoice(KVSpec("dense", DenseParams(_SHORT[options[0]] if options else "float32")),
                        ":".join(["dense", *options]))

    def cache(self, layer, batch, binding):
        return DenseKVCache(layer, batch, binding)

    def bytes_per_token(self, params, layer):
        return 2 * layer.kv_dim * DTYPES[params.dtype].itemsize

    def bytes_held(self, params, layer, n_tokens):
        return n_tokens * self.bytes_per_token(params, layer)

    def cost(self, params, layer, context):
        # q·Kᵀ and P·V over every cached token: 2 MACs per (query head, token, channel)
        return KVCost(bytes_read=context * self.bytes_per_token(params, layer),
                      flops=2 * 2 * layer.n_heads * layer.head_dim * context)

    def lossless(self, params):
        return params.dtype == "float32"
