"""Reference KV caches from transformers, evaluated the way mcomp's caches are (bench_kv.py).

`python benchmarks/bench_kv.py --references dynamic quanto4 quanto2` adds rows measured here:
the same checkpoint loaded with transformers (fp32, sdpa attention), decoded token by token
(one token per forward, `past_key_values=<cache>`) over exactly the windows of
`Session.streaming_perplexity(mode="stream")` (the caller passes `Session.windows(...)`: BOS
first, ctx-1 text tokens per window), with the same metrics (mcomp.runtime.metrics): ppl over
the ctx-1 predicted tokens of each window, KL(no-cache || cached) and top-1 agreement against
the same transformers model run over the whole window without a cache.

References:

- "dynamic": `DynamicCache` (no quantization) — the harness check: KL must be ≈ 0.
- "quanto4" / "quanto2": `QuantizedCache(backend="quanto", nbits=4|2, axis_key=0, axis_value=0,
  q_group_size=32, residual_length=128)`.

What quanto's axes mean (optimum-quanto 0.2.7, `tensor/grouped.py`), for a (B, H, T, D)
contiguous K or V tensor:
- axis=0: reshape to (-1, q_group_size): each group is q_group_size consecutive elements of
  one token's head vector (D=64 → 2 groups per token and head) — per-token quantization, what
  KIVI does for V (mcomp `kivi*` V, and K in the `:kt` ablation).
- axis=-1: one scale per channel d over groups of q_group_size consecutive rows of the flattened
  (B·H·T) axis — per-channel keys (KIVI's K). Unusable for token-by-token decode: the layer
  quantizes its first update immediately (T=1), and quanto requires q_group_size to divide
  B·H·T, so it raises "Group size (32) must be a divisor of (3)" at the first token (and at
  T=129, 257, ... flushes); rows also straddle head boundaries whenever T % group ≠ 0.
So per-channel keys cannot be reproduced with the quanto backend in streaming decode; the
reference uses transformers' default axes (0, 0): per-token K and V groups of 32 channels.

Cache behaviour (transformers 5.24 `QuantizedLayer.update`): the first update (the BOS token) is
quantized at once; later tokens go to an fp residual; when residual + new ≥ residual_length
(128), the dequantized store + residual + new tokens are all re-quantized from scratch and the
residual empties (so 0..127 recent tokens are in full precision). With axis=0 every group lies
within one token, so re-quantizing dequantized tokens is (up to fp rounding) idempotent.
quanto quirk: a store that is exactly one group (B·H·T·D = q_group_size, e.g. the first token
of a 1-KV-head, head_dim-32 model at batch 1) is kept exactly (its optimizer then falls back to
an element-wise min/max); the real models' first token is ≥ 6 groups.
`QuantizedCache` refuses configs with sliding-window layers (Gemma 3); for those, a `Cache` of
the same `QuantoQuantizedLayer`s is built directly (no eviction; transformers still applies the
window in the attention mask) — equivalent when ctx ≤ the window, as in bench_kv's Gemma rows.

Bytes per token are measured from the cache: packed codes (`_data`, uint8) + `_scale` + `_shift`
of every layer's K and V store, divided by the tokens in the store. quanto keeps scale and shift
in the activation dtype (fp32 here): 8 bytes per 32 values, 2 bits/value on top of the codes
(mcomp stores fp16 scale/min: 1 bit/value); `bytes_per_token_fp16_scales` gives the figure with
16-bit scales for an equal-storage comparison.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError
from ..runtime import metrics

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReferenceCache:
    """One transformers cache configuration (`kind` "dynamic" or "quanto")."""

    name: str
    label: str
    kind: str
    nbits: int | None = None
    axis_key: int | None = None
    axis_value: int | None = None
    q_group_size: int | None = None
    residual_length: int | None = None

    def config_str(self) -> str:
        if self.kind == "dynamic":
            return "DynamicCache()"
        return (f'QuantizedCache(backend="quanto", nbits={self.nbits}, axis_key={self.axis_key}, '
                f"axis_value={self.axis_value}, q_group_size={self.q_group_size}, "
                f"residual_length={self.residual_length})")

    def to_dict(self) -> dict:
        return {**asdict(self), "config": self.config_str()}


_QUANTO = dict(kind="quanto", axis_key=0, axis_value=0, q_group_size=32, residual_length=128)
REFERENCES: dict[str, ReferenceCache] = {
    "dynamic": ReferenceCache("dynamic", "transformers DynamicCache (harness check)", "dynamic"),
    "quanto4": ReferenceCache("quanto4", "transformers QuantizedCache (quanto, 4-bit)", nbits=4,
                              **_QUANTO),
    "quanto2": ReferenceCache("quanto2", "transformers QuantizedCache (quanto, 2-bit)", nbits=2,
                              **_QUANTO),
}


def get_reference(name: str) -> ReferenceCache:
    if name not in REFERENCES:
        raise ConfigError(f"unknown reference cache '{name}'; choices: {', '.join(REFERENCES)}")
    return REFERENCES[name]


def load_hf_model(source: str | Path, attn_implementation: str = "sdpa"):
    """The transformers model of an mcomp model source (built-in name, HF folder, GGUF), fp32,
    from the same HF folder mcomp imports (frontend.resolve_hf_dir)."""
    from transformers import AutoModelForCausalLM

    from ..compiler.frontend import base as frontend

    hf_dir = frontend.resolve_hf_dir(source)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return model.eval()


def make_cache(model, ref: ReferenceCache):
    """A fresh transformers cache for `model` following `ref`."""
    from transformers import cache_utils

    cfg = model.config.get_text_config(decoder=True)
    if ref.kind == "dynamic":
        return cache_utils.DynamicCache(config=model.config)
    if ref.kind != "quanto":
        raise ConfigError(f"unknown reference kind '{ref.kind}'")
    kw = dict(nbits=ref.nbits, axis_key=ref.axis_key, axis_value=ref.axis_value,
              q_group_size=ref.q_group_size, residual_length=ref.residual_length)
    layer_types = getattr(cfg, "layer_types", None) or []
    if all(t == "full_attention" for t in layer_types):
        return cache_utils.QuantizedCache(backend="quanto", config=model.config, **kw)
    # QuantizedCache rejects sliding-window models; same layers, built directly (module docstring)
    return cache_utils.Cache(layers=[cache_utils.QuantoQuantizedLayer(**kw)
                                     for _ in range(cfg.num_hidden_layers)])


def _qtensor_nbytes(q) -> int:
    """Storage of a quanto quantized tensor: packed codes + scale + shift."""
    names, _ = q.__tensor_flatten__()
    total = 0
    for n in names:
        t = getattr(q, n)
        inner = getattr(t, "_data", t)       # PackedTensor → its uint8 storage
        total += inner.numel() * inner.element_size()
    return total


def cache_bytes(cache) -> dict:
    """What the cache holds now: quantized store bytes and tokens, fp residual bytes."""
    q_bytes = q_fp16 = 0
    q_tokens = set()
    fp_bytes = 0
    for layer in cache.layers:
        qk = getattr(layer, "_quantized_keys", None)
        if qk is not None:
            for q in (qk, layer._quantized_values):
                q_bytes += _qtensor_nbytes(q)
                # the same store with 16-bit scale and shift
                q_fp16 += _qtensor_nbytes(q) - (q._scale.numel() + q._shift.numel()) * (
                    q._scale.element_size() - 2)
            q_tokens.add(qk.shape[0] * qk.shape[-2])     # B · T_q
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                fp_bytes += t.numel() * t.element_size()
    if len(q_tokens) > 1:
        raise RuntimeError(f"layers hold different quantized lengths: {sorted(q_tokens)}")
    n_q = q_tokens.pop() if q_tokens else 0
    return {"quantized_bytes": q_bytes, "quantized_bytes_fp16_scales": q_fp16,
            "quantized_tokens": n_q, "fp_bytes": fp_bytes}


@torch.inference_mode()
def stream_logits(model, x: torch.Tensor, cache) -> torch.Tensor:
    """Token-by-token decode of x (b, T) through `cache`: logits (b, T, V) fp32, row t computed
    from a forward of token t alone with the previous T-1 tokens in the cache. (Tests only:
    keeps every step's logits.)"""
    b, T = x.shape
    out = []
    for t in range(T):
        pos = torch.full((b, 1), t, dtype=torch.long)
        out.append(model(input_ids=x[:, t:t + 1], position_ids=pos, cache=cache,
                         use_cache=True).logits.float())                  # (b, 1, V)
    return torch.cat(out, dim=1)


@torch.inference_mode()
def streaming_eval(model, windows: torch.Tensor, ref: ReferenceCache, batch_size: int = 1,
                   progress: Progress | None = None) -> dict:
    """Session.streaming_perplexity(mode="stream") for a transformers model and cache: windows
    (W, ctx) from Session.windows; returns the same keys (ppl, nll, base_ppl, kld,
    top1_agreement, tokens_scored, windows, ctx, mode, kv, kv_bytes_per_token, seconds) plus
    the measured cache storage."""
    W, ctx = windows.shape
    nll = base_nll = kld = 0.0
    top1 = 0
    bpt = bpt16 = None
    store = None
    t0 = time.perf_counter()
    total, done = -(-W // batch_size) * (ctx - 1), 0
    for start in range(0, W, batch_size):
        x = windows[start:start + batch_size]                              # (b, ctx)
        b = x.shape[0]
        tgt = x[:, 1:]                                                     # (b, ctx-1)
        base = model(input_ids=x, use_cache=False).logits.float()           # (b, ctx, V)
        cache = make_cache(model, ref)
        for t in range(ctx - 1):  # the last token predicts nothing scored
            pos = torch.full((b, 1), t, dtype=torch.long)
            lg = model(input_ids=x[:, t:t + 1], position_ids=pos, cache=cache,
                       use_cache=True).logits.float()                      # (b, 1, V)
            r = base[:, t:t + 1]                                           # (b, 1, V)
            nll += metrics.token_nll(lg, tgt[:, t:t + 1]).double().sum().item()
            base_nll += metrics.token_nll(r, tgt[:, t:t + 1]).double().sum().item()
            kld += metrics.token_kl(r, lg).double().sum().item()
            top1 += int(metrics.token_top1(r, lg).sum())
            done += 1
            if progress is not None:
                progress(done, total)
        store = cache_bytes(cache)
        if ref.kind == "dynamic":
            n = cache.get_seq_length() * b
            bpt = bpt16 = store["fp_bytes"] / n
        elif store["quantized_tokens"]:
            bpt = store["quantized_bytes"] / store["quantized_tokens"]
            bpt16 = store["quantized_bytes_fp16_scales"] / store["quantized_tokens"]
        del base, cache
    scored = W * (ctx - 1)
    return {"ppl": math.exp(nll / scored), "nll": nll / scored,
            "base_ppl": math.exp(base_nll / scored), "kld": kld / scored,
            "top1_agreement": top1 / scored, "tokens_scored": scored, "windows": W, "ctx": ctx,
            "mode": "stream", "kv": [ref.config_str()], "kv_bytes_per_token": bpt,
            "kv_bytes_per_token_fp16_scales": bpt16, "cache_state_last_window": store,
            "seconds": round(time.perf_counter() - t0, 2)}


@torch.inference_mode()
def compare_no_cache(model, gm, windows: torch.Tensor, chunk: int = 128) -> dict:
    """transformers vs mcomp (IR `gm`) logits without a cache on the same windows: max |Δlogit|,
    mean KL(mcomp || transformers), top-1 agreement. Chunked over positions to bound memory."""
    W, ctx = windows.shape
    pos = torch.arange(ctx)[None, :]
    mx = kl = 0.0
    top1 = n = 0
    for w in range(W):
        x = windows[w:w + 1]                                               # (1, ctx)
        hf = model(input_ids=x, use_cache=False).logits.float()[0]         # (ctx, V)
        ours = gm(x, pos, None).float()[0]                                 # (ctx, V)
        for s in range(0, ctx, chunk):
            a, c = ours[s:s + chunk], hf[s:s + chunk]
            mx = max(mx, (a - c).abs().max().item())
            kl += metrics.token_kl(a, c).double().sum().item()
            top1 += int(metrics.token_top1(a, c).sum())
            n += a.shape[0]
        del hf, ours
    return {"max_abs_logit": mx, "kld": kl / n, "top1": top1 / n, "tokens": n}
