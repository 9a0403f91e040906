"""KV representations and the per-forward attention state.

A KV representation is one class that knows how to append new K/V, how many bytes a token
costs, and how to attend over what it holds (a pure-torch reference; fast kernels may
override). The runtime builds one container per layer from that layer's KVSpec. New kinds
(quantized, latent, rematerialized) register in KV_REPRESENTATIONS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compiler.spec import LayerSpec, ModelSpec
from ..registry import Registry

KV_REPRESENTATIONS: Registry = Registry("KV representation")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVCache:
    """Interface of a per-layer KV container."""

    def __init__(self, layer: LayerSpec, batch: int):
        self.layer = layer
        self.batch = batch
        self.length = 0

    @staticmethod
    def bytes_per_token(layer: LayerSpec) -> int:
        """Exact bytes one token costs in this layer (K and V, all KV heads, metadata included)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return self.bytes_per_token(self.layer) * self.length * self.batch

    # Evaluation mode for lossy representations: a multi-token chunk attends over the cache
    # exactly as token-by-token decode would have (each query sees what had been quantized by
    # its own step). Lossless representations have nothing to do.
    quantize_before_attend: bool = False

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V as the model computed them (B, Hkv, T, D), as `attend` with a prefill chunk
        would, without attending (e.g. to fill this cache from another cache's prefill). A
        representation that keeps keys in another basis maps them here, as in `attend`."""
        self.append(k, v)

    def attend(self, q, k, v, scale: float, mask: torch.Tensor) -> torch.Tensor:
        """Append k/v (B, Hkv, T, D), then attend q (B, Hq, T, D) over the whole cache.
        mask: (B, 1, T, S) bool, True = may attend; None = causal over exactly these T tokens
        (the cache was empty). Returns (B, Hq, T, D)."""
        raise NotImplementedError


@KV_REPRESENTATIONS.register("dense")
class DenseKVCache(KVCache):
    """Full-precision K/V in a preallocated buffer that grows by doubling (amortized O(1) append)."""

    def __init__(self, layer: LayerSpec, batch: int):
        super().__init__(layer, batch)
        self.dtype = _DTYPES[layer.kv.dtype]
        self.k = self.v = None

    @staticmethod
    def bytes_per_token(layer: LayerSpec) -> int:
        return 2 * layer.kv_dim * _DTYPES[layer.kv.dtype].itemsize

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        cap = 0 if self.k is None else self.k.shape[2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 64)
        B, H, _, D = like.shape
        k = like.new_empty((B, H, new_cap, D), dtype=self.dtype)
        v = like.new_empty((B, H, new_cap, D), dtype=self.dtype)
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

    def attend(self, q, k, v, scale, mask):
        k_all, v_all = self.append(k, v)  # (B, Hkv, S, D)
        return F.scaled_dot_product_attention(
            q, k_all.to(q.dtype), v_all.to(q.dtype), attn_mask=mask, is_causal=mask is None,
            scale=scale, enable_gqa=q.shape[1] != k_all.shape[1])


class AttentionState:
    """Decoding state shared by every layer: the caches, and which cached key sits at which
    position and is real (not padding). One instance lives across a whole generation.

    Usage per forward: `state.begin(positions, valid)` then `model(ids, positions, state)`.
    """

    def __init__(self, spec: ModelSpec, batch: int, quantize_before_attend: bool = False):
        self.caches = [KV_REPRESENTATIONS.get(l.kv.kind)(l, batch) for l in spec.layers]
        for c in self.caches:  # see KVCache.quantize_before_attend
            c.quantize_before_attend = quantize_before_attend
        self.batch = batch
        self.key_pos = torch.empty(batch, 0, dtype=torch.long)
        self.key_valid = torch.empty(batch, 0, dtype=torch.bool)
        self.q_pos = None
        self._masks: dict = {}
        self._plain_causal = False
        #: the model computes logits for the last position only (see select_logit_positions)
        self.last_logits_only = False

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if valid is None:
            valid = torch.ones_like(positions, dtype=torch.bool)
        first = self.key_pos.shape[1] == 0
        self.q_pos = positions
        self.key_pos = torch.cat([self.key_pos, positions], dim=1)
        self.key_valid = torch.cat([self.key_valid, valid], dim=1)
        self._masks = {}
        T = positions.shape[1]
        self._plain_causal = (first and bool(valid.all())
                              and bool((positions == torch.arange(T)).all()))

    def mask(self, window: int | None) -> torch.Tensor | None:
        """(B, 1, T, S) bool: causal by position, within the window, key not padding.

        None means "plain causal over exactly these tokens" (first chunk, no padding, no window
        reaching back): attention may then use SDPA's is_causal path, which needs no mask."""
        if window not in self._masks:
            if self._plain_causal and (window is None or window >= self.length):
                self._masks[window] = None
                return None
            qp = self.q_pos[:, :, None]             # (B, T, 1)
            kp = self.key_pos[:, None, :]           # (B, 1, S)
            m = self.key_valid[:, None, :] & (kp <= qp)
            if window is not None:
                m = m & (qp - kp < window)
            # a padded query row may see nothing; let it see everything so softmax stays finite
            m = m | ~m.any(dim=-1, keepdim=True)
            self._masks[window] = m[:, None]
        return self._masks[window]

    def attend(self, layer: int, q, k, v, scale: float, window: int | None):
        return self.caches[layer].attend(q, k, v, scale, self.mask(window))

    @property
    def length(self) -> int:
        return self.key_pos.shape[1]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)


from . import kv as _kv  # noqa: E402,F401  registers the non-dense representations
