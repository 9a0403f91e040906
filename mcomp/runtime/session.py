"""Session: a runnable model (IR GraphModule + tokenizer) that generates text and measures
quality.

Quality follows the protocol in docs/architecture.md ("Measuring quality"): tokenize without
BOS, cut into non-overlapping windows of ctx-1 text tokens, put BOS in front of each window
(ctx tokens per window), score every text token of the window (the ctx-1 targets; BOS is
context only), mean NLL over all of them; the final partial window is dropped. `perplexity`
and `compare` share `make_windows` / `window_logits`, so KL and top-1 are measured on exactly
the windows perplexity scores.

The library never prints; long evaluations report through a `progress(done, total)` callable.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import fx

from ..compiler import ir
from ..errors import ConfigError
from . import metrics
from .generate import GenerationStats, decode_steps, generate_ids
from .tokenizer import Tokenizer

log = logging.getLogger("mcomp.runtime")

Progress = Callable[[int, int], None]

#: Budget for one batch of evaluation logits (B * ctx * V fp32); picks the default batch size.
LOGITS_BUDGET_BYTES = 512 << 20
MAX_EVAL_BATCH = 4


STREAM_MODES = ("stream", "prefill")   # Session.streaming_perplexity


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float                # mean NLL (nats) per predicted token
    tokens_scored: int        # windows * (ctx - 1)
    windows: int
    ctx: int

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- windows

def make_windows(ids: Sequence[int] | torch.Tensor, ctx: int, bos_id: int,
                 max_tokens: int | None = None) -> torch.Tensor:
    """Text ids (no BOS) → (W, ctx) long: W non-overlapping windows of ctx-1 text tokens, each
    behind a BOS. At most `max_tokens` text tokens are consumed; the partial tail is dropped."""
    if ctx < 2:
        raise ConfigError(f"ctx must be >= 2 (BOS plus at least one scored token), got {ctx}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()            # (N,)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = ids[:max_tokens]
    step = ctx - 1
    W = ids.numel() // step
    if W == 0:
        raise ConfigError(f"text too short for one window: {ids.numel()} tokens, a window of "
                          f"ctx={ctx} needs {step} text tokens")
    body = ids[: W * step].view(W, step)                               # (W, ctx-1)
    bos = torch.full((W, 1), bos_id, dtype=torch.long)                 # (W, 1)
    return torch.cat([bos, body], dim=1)                               # (W, ctx)


def default_batch_size(ctx: int, vocab: int) -> int:
    """Windows per forward: as many as fit LOGITS_BUDGET_BYTES of fp32 logits, 1..4."""
    return max(1, min(MAX_EVAL_BATCH, LOGITS_BUDGET_BYTES // (ctx * vocab * 4)))


def window_logits(gm: fx.GraphModule, windows: torch.Tensor, batch_size: int | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """Forward windows (W, ctx) in batches with plain causal attention (state=None), yielding
    (index of the batch's first window, logits (b, ctx, V) fp32)."""
    W, ctx = windows.shape
    bs = batch_size or default_batch_size(ctx, ir.get_spec(gm).vocab_size)
    positions = torch.arange(ctx)[None, :]                             # (1, ctx)
    for start in range(0, W, bs):
        x = windows[start:start + bs]                                  # (b, ctx)
        with torch.inference_mode():
            logits = gm(x, positions.expand(x.shape[0], ctx), None)    # (b, ctx, V)
        yield start, logits


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


# ----------------------------------------------------------------------------- session

class Session:
    """A model ready to run: `Session(gm, tokenizer)`.

    `gm` is an IR GraphModule (spec in `gm.meta["mcomp.spec"]`) following the call convention
    `gm(input_ids (B, T), positions (B, T), state) -> logits (B, T, V)`. Loaders (a HF/GGUF
    source via `from_model`, an artifact) build the gm and tokenizer and call this constructor.
    `tokenizer` may be None for id-level use (`generate_ids`, `perplexity` on ids).
    """

    def __init__(self, gm: fx.GraphModule, tokenizer: Tokenizer | None = None):
        self.gm = gm
        self.spec = ir.get_spec(gm)
        self.tokenizer = tokenizer
        # special ids: the tokenizer's (which already prefer the spec's), else the spec's
        tok = tokenizer
        bos = tok.bos_id if tok is not None else None
        self.bos_id: int | None = bos if bos is not None else self.spec.bos_token_id
        self.eos_ids: tuple[int, ...] = (tok.eos_ids if tok is not None and tok.eos_ids
                                         else tuple(self.spec.eos_token_ids))
        pad = tok.pad_id if tok is not None else None
        pad = pad if pad is not None else self.spec.pad_token_id
        # pads are masked out, so any in-vocabulary id works; prefer the declared one
        self.pad_id: int = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.last_stats: GenerationStats | None = None
        if tokenizer is not None and tokenizer.vocab_size > self.spec.vocab_size:
            log.warning("tokenizer has %d tokens but the model's vocabulary is %d",
                        tokenizer.vocab_size, self.spec.vocab_size)

    @classmethod
    def from_model(cls, source: str | os.PathLike) -> "Session":
        """Import a model source (built-in name, HF folder, GGUF file) uncompressed."""
        from ..compiler.frontend import import_model

        imported = import_model(source)
        gm = ir.build(imported.spec, imported.state_dict)
        return cls(gm, Tokenizer.from_dir(imported.hf_dir, imported.spec))

    def __repr__(self) -> str:
        return (f"Session(family={self.spec.family!r}, layers={self.spec.n_layers}, "
                f"vocab={self.spec.vocab_size})")

    # ------------------------------------------------------------------ helpers

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ConfigError("this session has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def _eval_bos(self) -> int:
        """BOS for evaluation windows; models without one use their first EOS as separator."""
        if self.bos_id is not None:
            return self.bos_id
        if self.eos_ids:
            log.warning("model has no BOS token; evaluation windows start with EOS id %d",
                        self.eos_ids[0])
            return self.eos_ids[0]
        raise ConfigError("model has neither a BOS nor an EOS token to start evaluation windows")

    def encode_prompts(self, prompts: Sequence[str], add_bos: bool | None = None
                       ) -> list[list[int]]:
        """Prompt ids; BOS follows `add_bos` (default: the tokenizer's convention). A prompt
        that encodes to nothing gets a BOS anyway, since generation needs one context token."""
        tok = self._require_tokenizer()
        add = tok.add_bos_default if add_bos is None else add_bos
        out = tok.encode_batch(prompts, add_bos=False)
        for ids in out:
            if (add or not ids) and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if not ids:
                raise ConfigError("empty prompt and no BOS token to start from")
        return out

    def _text_ids(self, text_or_ids: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(text_or_ids, str):
            return torch.tensor(self._require_tokenizer().encode(text_or_ids, add_bos=False),
                                dtype=torch.long)
        return torch.as_tensor(text_or_ids, dtype=torch.long).flatten()

    # ------------------------------------------------------------------ generation

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     stop_at_eos: bool = True) -> list[list[int]]:
        """New token ids per prompt (EOS excluded), batched with left padding."""
        self.last_stats = GenerationStats()
        return generate_ids(self.gm, prompts, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed,
                            eos_ids=self.eos_ids, stop_at_eos=stop_at_eos, pad_id=self.pad_id,
                            stats=self.last_stats)

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True, add_bos: bool | None = None) -> list[str]:
        """Continuations (prompt not included) of one or more prompts; always a list.

        Greedy when temperature == 0; otherwise temperature / top-p sampling from a
        torch.Generator seeded with `seed` (same seed, same prompts → same text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        ids = self.encode_prompts(list(prompts), add_bos)
        new = self.generate_ids(ids, max_new_tokens, temperature, top_p, seed, stop_at_eos)
        tok = self._require_tokenizer()
        return [tok.decode(row) for row in new]

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
               add_bos: bool | None = None) -> Iterator[str]:
        """Text pieces of one prompt's continuation as they become final (never a partial
        UTF-8 character); their concatenation equals `generate(...)[0]`."""
        tok = self._require_tokenizer()
        ids = self.encode_prompts([prompt], add_bos)
        dec = tok.stream_decoder()
        self.last_stats = GenerationStats()
        for t, emit in decode_steps(self.gm, ids, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed,
                                    eos_ids=self.eos_ids, stop_at_eos=stop_at_eos,
                                    pad_id=self.pad_id, stats=self.last_stats):
            if not bool(emit[0]):
                break
            piece = dec.push(int(t[0]))
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    # ------------------------------------------------------------------ evaluation

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Plain causal forward (no cache): input_ids (B, T) → logits (B, T, V) fp32."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if positions is None:
            positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        with torch.inference_mode():
            return self.gm(input_ids, positions, None)

    def windows(self, text_or_ids: str | Sequence[int] | torch.Tensor, ctx: int = 512,
                max_tokens: int | None = None) -> torch.Tensor:
        """The evaluation windows (W, ctx) perplexity/compare score for this input."""
        return make_windows(self._text_ids(text_or_ids), ctx, self._eval_bos(), max_tokens)

    def perplexity(self, text_or_ids: str | Sequence[int] | torch.Tensor, ctx: int = 512,
                   max_tokens: int | None = None, progress: Progress | None = None,
                   batch_size: int | None = None) -> PerplexityResult:
        """Perplexity over BOS-prefixed non-overlapping windows (see module docstring)."""
        self._check_ctx(ctx)
        wins = self.windows(text_or_ids, ctx, max_tokens)              # (W, ctx)
        W = wins.shape[0]
        nll_sum = 0.0
        _report(progress, 0, W)
        for start, logits in window_logits(self.gm, wins, batch_size):  # (b, ctx, V)
            for j in range(logits.shape[0]):  # one window at a time bounds the temporaries
                nll = metrics.token_nll(logits[j, :-1], wins[start + j, 1:])  # (ctx-1,)
                nll_sum += nll.double().sum().item()
            _report(progress, start + logits.shape[0], W)
        scored = W * (ctx - 1)
        nll = nll_sum / scored
        return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens_scored=scored, windows=W,
                                ctx=ctx)

    def compare(self, base: "Session | fx.GraphModule",
                text_or_ids: str | Sequence[int] | torch.Tensor, ctx: int = 512,
                max_tokens: int | None = None, progress: Progress | None = None,
                batch_size: int | None = None) -> dict:
        """Quality of this model against `base` (usually the uncompressed model) on the same
        windows: mean KL(base || this) per predicted token, top-1 agreement, both perplexities.
        Tokenization and BOS come from this session."""
        base_gm = base.gm if isinstance(base, Session) else base
        base_vocab = ir.get_spec(base_gm).vocab_size
        if base_vocab != self.spec.vocab_size:
            raise ConfigError(f"cannot compare models with different vocabularies "
                              f"({base_vocab} vs {self.spec.vocab_size})")
        self._check_ctx(ctx)
        wins = self.windows(text_or_ids, ctx, max_tokens)              # (W, ctx)
        W = wins.shape[0]
        nll = base_nll = kld = kld_max = 0.0
        top1 = 0
        _report(progress, 0, W)
        pairs = zip(window_logits(base_gm, wins, batch_size),
                    window_logits(self.gm, wins, batch_size))
        for (start, ref), (_, new) in pairs:                          # (b, ctx, V) each
            for j in range(new.shape[0]):
                r, n = ref[j, :-1], new[j, :-1]                         # (ctx-1, V)
                tgt = wins[start + j, 1:]                               # (ctx-1,)
                nll += metrics.token_nll(n, tgt).double().sum().item()
                base_nll += metrics.token_nll(r, tgt).double().sum().item()
                kl = metrics.token_kl(r, n).double()                    # (ctx-1,)
                kld += kl.sum().item()
                kld_max = max(kld_max, kl.max().item())
                top1 += int(metrics.token_top1(r, n).sum())
            _report(progress, start + new.shape[0], W)
        scored = W * (ctx - 1)
        return {
            "kld": kld / scored,
            "kld_max": kld_max,
            "top1_agreement": top1 / scored,
            "ppl": math.exp(nll / scored),
            "base_ppl": math.exp(base_nll / scored),
            "tokens_scored": scored,
            "windows": W,
            "ctx": ctx,
        }

    # ------------------------------------------------------------------ KV evaluation
    # KV compression is only seen when attention reads the cache (docs/architecture.md,
    # "Measuring quality"): plain `perplexity` runs without a cache and measures nothing of it.

    def streaming_perplexity(self, text_or_ids: str | Sequence[int] | torch.Tensor, ctx: int = 512,
                             max_tokens: int | None = 1024, mode: str = "stream",
                             progress: Progress | None = None, batch_size: int | None = None
                             ) -> dict:
        """Perplexity with every layer's KV representation in the loop, on the same windows as
        `perplexity`, plus KL(uncompressed-KV || this) and top-1 agreement against a plain causal
        forward of the same model (the same weights with an exact cache).

        mode "stream": token-by-token decode through the real cache (the windows of a batch advance
        together, one token per step) — what a deployed decoder sees.
        mode "prefill": one forward per window over a cache in quantize-before-attend mode: every
        query attends to exactly the state streaming decode would have had at its step (equal to
        "stream" up to float rounding, much faster)."""
        from .kv import model_bytes_per_token
        from .kvcache import AttentionState
        import time

        if mode not in STREAM_MODES:
            raise ConfigError(f"mode '{mode}' not in {', '.join(STREAM_MODES)}")
        self._check_ctx(ctx)
        wins = self.windows(text_or_ids, ctx, max_tokens)                  # (W, ctx)
        W = wins.shape[0]
        bs = batch_size or default_batch_size(ctx, self.spec.vocab_size)
        nll = base_nll = kld = 0.0
        top1 = 0
        t0 = time.perf_counter()
        n_batches = -(-W // bs)
        total = n_batches * (ctx if mode == "stream" else 1)
        done = 0
        _report(progress, 0, total)
        for start in range(0, W, bs):
            x = wins[start:start + bs]                                     # (b, ctx)
            b = x.shape[0]
            pos = torch.arange(ctx)[None, :].expand(b, ctx)                # (b, ctx)
            tgt = x[:, 1:]                                                 # (b, ctx-1)
            with torch.inference_mode():
                base = self.gm(x, pos, None)                               # (b, ctx, V)
            state = AttentionState(self.spec, b, quantize_before_attend=mode == "prefill",
                                   model=self.gm)
            if mode == "prefill":
                with torch.inference_mode():
                    state.begin(pos)
                    logits = self.gm(x, pos, state)                        # (b, ctx, V)
                steps = [(slice(0, ctx - 1), logits[:, :-1])]
                done += 1
                _report(progress, done, total)
            else:
                steps = []
                for t in range(ctx - 1):  # the last token predicts nothing scored
                    with torch.inference_mode():
                        state.begin(pos[:, t:t + 1])
                        lt = self.gm(x[:, t:t + 1], pos[:, t:t + 1], state)  # (b, 1, V)
                    steps.append((slice(t, t + 1), lt))
                    done += 1
                    _report(progress, done, total)
                done += 1
            for sl, lg in steps:
                r = base[:, sl]                                            # (b, n, V)
                nll += metrics.token_nll(lg, tgt[:, sl]).double().sum().item()
                base_nll += metrics.token_nll(r, tgt[:, sl]).double().sum().item()
                kld += metrics.token_kl(r, lg).double().sum().item()
                top1 += int(metrics.token_top1(r, lg).sum())
            _report(progress, done, total)
        scored = W * (ctx - 1)
        labels = sorted({l.kv.label() for l in self.spec.layers})
        bpt = model_bytes_per_token(self.spec)
        return {"ppl": math.exp(nll / scored), "nll": nll / scored,
                "base_ppl": math.exp(base_nll / scored), "kld": kld / scored,
                "top1_agreement": top1 / scored, "tokens_scored": scored, "windows": W, "ctx": ctx,
                "mode": mode, "kv": labels, "kv_bytes_per_token": bpt,
                "seconds": round(time.perf_counter() - t0, 2)}

    def _check_ctx(self, ctx: int) -> None:
        if self.spec.learned_positions and ctx > self.spec.learned_positions:
            raise ConfigError(f"ctx={ctx} exceeds the model's {self.spec.learned_positions} "
                              "learned positions")
        if ctx > self.spec.max_positions:
            log.warning("ctx=%d exceeds the model's max_positions=%d", ctx,
                        self.spec.max_positions)

