"""The cache boundary: the per-layer KV container interface, the layer binding a cache may use,
and the per-forward attention state shared by every layer.

A layer hands its cache (`KVCache.attend`) the post-RoPE queries, the K/V its projections made
of the new tokens, the attention input `h` they were made from (the normed hidden state), and,
through the `KVBinding` the cache was built with, the layer's K/V projections and RoPE as
functions. A dense or KIVI cache stores the given K/V; a rematerializing cache (xquant) stores
`h` (or a latent of it) and recomputes K/V through the binding. It returns the attention output.

The kinds themselves (params, shorthand, bytes, cost, cache factory) live in runtime/kv/, one
file each, registered in `runtime.kv.KV_KINDS`.
"""
from __future__ import annotations

import torch

from ..compiler.spec import LayerSpec, ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVBinding:
    """A layer's K/V projections and RoPE, resolved lazily in the model the state runs with (so
    a pass that swaps a module, e.g. quantization, is seen). A cache that rematerializes K/V
    from the attention input calls these; dense and KIVI caches never do."""

    def __init__(self, model, layer: int, shared: dict | None = None):
        self.model = model
        self.layer = layer
        #: scratch shared by every layer's cache of one AttentionState, for representations that
        #: span layers (xquant-cl keeps its cross-layer accumulator here); keys are kind names
        self.shared = {} if shared is None else shared

    def module(self, name: str):
        return self.model.get_submodule(f"layers.{self.layer}.{name}")

    def has(self, name: str) -> bool:
        try:
            self.module(name)
            return True
        except AttributeError:
            return False

    def state(self) -> dict[str, torch.Tensor]:
        """The layer's KV-kind tensors (compiler/model.py: KVState); empty if it has none."""
        try:
            return self.module("kv_state").tensors()
        except AttributeError:
            return {}

    def rotary(self, positions: torch.Tensor):
        """positions (B, T) → (cos, sin) (B, 1, T, D) of this layer's RoPE, or None (no RoPE)."""
        if not hasattr(self, "_rope"):     # which table is fixed by the spec: look it up once
            from ..compiler import ir
            from ..compiler.model import rope_table_index
            spec = ir.get_spec(self.model)
            rope = spec.layers[self.layer].rope
            self._rope = (None if rope is None else
                          f"rope.{rope_table_index(spec)[rope]}")
        if self._rope is None:
            return None
        return self.model.get_submodule(self._rope)(positions)


class KVCache:
    """Interface of a per-layer KV container (built by its kind's `cache` factory)."""

    def __init__(self, layer: LayerSpec, batch: int, binding: KVBinding | None = None):
        self.layer = layer
        self.batch = batch
        self.binding = binding
        self.length = 0          # tokens appended so far (evicted ones included)
        self.n_evicted = 0       # tokens a sliding window dropped

    @property
    def n_held(self) -> int:
        return self.length - self.n_evicted

    def nbytes(self) -> int:
        """Exact bytes of every tensor the cache holds, over their used extent."""
        raise NotImplementedError

    def reserve(self, tokens: int) -> None:
        """Allocate room for `tokens` tokens in total now. A caller that knows the final length
        (a generation's prompt + max_new_tokens) thereby avoids the growth copies and the
        doubling's overshoot (up to 2× the cache's final bytes). A no-op for kinds that do not
        preallocate."""

    def quantized_span(self) -> tuple[int, int] | None:
        """Held columns [lo, hi) that are stored quantized; None for a lossless cache."""
        return None

    # Evaluation mode for lossy representations: a multi-token chunk attends over the cache
    # exactly as token-by-token decode would have (each query sees what had been quantized by
    # its own step). Lossless representations have nothing to do.
    quantize_before_attend: bool = False

    def load(self, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor | None = None) -> None:
        """Store K/V as the model computed them (B, Hkv, T, D), as `attend` with a prefill chunk
        would, without attending (e.g. to fill this cache from another cache's prefill). A
        representation that keeps keys in another basis maps them here, as in `attend`."""
        self.append(k, v)

    def attend(self, q, k, v, scale: float, mask: torch.Tensor, h: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Take the new tokens (k/v (B, Hkv, T, D) post-RoPE, h (B, T, hidden) the attention
        input they were projected from, positions (B, T) theirs, for RoPE through the binding),
        then attend q (B, Hq, T, D) over the whole cache.
        mask: (B, 1, T, S) bool, True = may attend; None = causal over exactly these T tokens
        (the cache was empty). Returns (B, Hq, T, D)."""
        raise NotImplementedError


class AttentionState:
    """Decoding state shared by every layer: the caches, and which cached key sits at which
    position and is real (not padding). One instance lives across a whole generation.

    Usage per forward: `state.begin(positions, valid)` then `model(ids, positions, state)`.
    """

    def __init__(self, spec: ModelSpec, batch: int, quantize_before_attend: bool = False,
                 model=None):
        from ..errors import ConfigError
        from .kv import KV_KINDS
        self.caches = []
        shared: dict = {"spec": spec}     # the spec these caches were built from
        for i, l in enumerate(spec.layers):
            kind = KV_KINDS.get(l.kv.kind)
            if kind.needs_binding and model is None:
                raise ConfigError(f"layer {i}: a '{l.kv.kind}' cache recomputes K/V through the "
                                  "model's projections: build AttentionState(..., model=gm)")
            self.caches.append(kind.cache(l, batch, KVBinding(model, i, shared)
                                           if model is not None else None))
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

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` tokens in every layer's cache (KVCache.reserve)."""
        for c in self.caches:
            c.reserve(tokens)

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

    def attend(self, layer: int, q, k, v, h, scale: float, window: int | None):
        return self.caches[layer].attend(q, k, v, scale, self.mask(window), h=h,
                                         positions=self.q_pos)

    @property
    def length(self) -> int:
        return self.key_pos.shape[1]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)


from . import kv as _kv  # noqa: E402,F401  registers the kinds
