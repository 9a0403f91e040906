"""Token generation over the IR: left-padded batched prefill, then one token per step through
the KV cache (AttentionState), greedy or seeded temperature / top-p sampling.

Works on token ids only; `Session` adds tokenization and streaming text on top. The core is a
Python generator (`decode_steps`) so that batch generation and streaming share one loop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import fx

from ..compiler.ir import get_spec
from ..errors import ConfigError
from .fastdecode import fast_decoder
from .kvcache import AttentionState

log = logging.getLogger("mcomp.runtime")


@dataclass
class GenerationStats:
    """Timing of the last generation. Decode counts incremental forwards (one token per row
    each), so decode tokens/s = decode_steps * batch / decode_seconds."""

    batch: int = 0
    prompt_tokens: int = 0        # real (non-padding) prompt tokens over all rows
    new_tokens: int = 0           # emitted tokens over all rows (EOS not counted)
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0

    def reset(self, batch: int, prompt_tokens: int) -> None:
        self.batch, self.prompt_tokens, self.new_tokens = batch, prompt_tokens, 0
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_steps = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps * self.batch / self.decode_seconds if self.decode_seconds else 0.0


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """Batch prompts with LEFT padding so every row's last real token is in the last column
    (prefill's final logits are then `[:, -1]` for all rows).

    Positions count from 0 at each row's first real token; pads get position 0 and valid=False,
    so the attention masks ignore them. Returns ids, positions, valid (each (B, T)) and the
    per-row lengths (B,)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    B, T = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)   # (B,)
    ids = torch.full((B, T), pad_id, dtype=torch.long)                     # (B, T)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    col = torch.arange(T)[None, :]                                         # (1, T)
    start = (T - lengths)[:, None]                                         # (B, 1)
    valid = col >= start                                                   # (B, T)
    positions = (col - start).clamp_min(0)                                 # (B, T)
    return ids, positions, valid, lengths


def select_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from last-position logits (B, V) → (B,) long.

    temperature == 0 is greedy (argmax). Otherwise softmax(logits / T), restricted to the
    smallest set of most likely tokens whose mass reaches top_p (the top token always stays),
    sampled with `generator` so a seed reproduces the draw."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)           # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)             # (B, V)
        mass_before = sorted_p.cumsum(-1) - sorted_p                      # (B, V)
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)     # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)   # (B,)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()  # fresh entropy: unseeded sampling should differ run to run
    else:
        g.manual_seed(int(seed))
    return g


def decode_steps(gm: fx.GraphModule, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 eos_ids: Sequence[int] = (), stop_at_eos: bool = True, pad_id: int = 0,
                 stats: GenerationStats | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield, per step, the chosen tokens (B,) and `emit` (B,) bool: whether that token is part
    of the row's output (False once the row finished, and for the EOS that finishes it).

    Prefill runs once over the left-padded batch; each later step feeds one token per row
    through the KV cache. Finished rows keep a slot in the batch (their inputs are marked
    invalid, so they cost compute but change nothing); the loop ends when all rows finished.
    inference_mode is entered per forward, never across a `yield`, so it does not leak into
    the caller while the generator is suspended.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    spec = get_spec(gm)
    ids, positions, valid, lengths = left_pad(prompts, pad_id)  # (B, T) x3, (B,)
    B = ids.shape[0]
    if stats is not None:
        stats.reset(batch=B, prompt_tokens=int(lengths.sum()))
    if max_new_tokens == 0:
        return
    longest = int(lengths.max()) + max_new_tokens
    if longest > spec.max_positions:
        if spec.learned_positions:
            raise ConfigError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's "
                              f"{spec.max_positions} positions")
        log.warning(
            "generating up to position %d, beyond the model's max_positions=%d; quality may "
            "degrade", longest, spec.max_positions)
    generator = make_generator(seed) if temperature > 0 else None
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    state = AttentionState(spec, B, model=gm)
    state.reserve(ids.shape[1] + max_new_tokens)                # the final length: no regrowth
    state.last_logits_only = True                               # sampling reads only [:, -1]
    finished = torch.zeros(B, dtype=torch.bool)                 # (B,)
    next_pos = lengths.clone()                                  # (B,) position of the next token

    t0 = time.perf_counter()
    with torch.inference_mode():
        state.begin(positions, valid)
        logits = gm(ids, positions, state)[:, -1]               # (B, V)
        tok = select_next(logits, temperature, top_p, generator)
    t_prefill = time.perf_counter() - t0
    if stats is not None:
        stats.prefill_seconds = t_prefill

    fast = fast_decoder(gm, state) if max_new_tokens > 1 else None   # None: the graph runs steps
    for step in range(max_new_tokens):
        is_eos = torch.isin(tok, eos) if stop_at_eos else torch.zeros_like(finished)
        emit = ~finished & ~is_eos                              # (B,)
        if stats is not None:
            stats.new_tokens += int(emit.sum())
        yield tok, emit
        finished |= is_eos
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            feed = torch.where(finished, pad_id, tok)[:, None]  # (B, 1)
            if fast is not None:                                # B == 1 and not finished
                logits = fast.step(feed)                        # (1, V)
            else:
                pos = next_pos[:, None]                         # (B, 1)
                state.begin(pos, ~finished[:, None])
                logits = gm(feed, pos, state)[:, -1]            # (B, V)
            tok = select_next(logits, temperature, top_p, generator)
        next_pos += 1
        if stats is not None:
            stats.decode_steps += 1
            stats.decode_seconds += time.perf_counter() - t0


def generate_ids(gm: fx.GraphModule, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 **kwargs) -> list[list[int]]:
    """New token ids per prompt (EOS excluded); see `decode_steps` for the arguments."""
    out: list[list[int]] = [[] for _ in prompts]
    for tok, emit in decode_steps(gm, prompts, max_new_tokens=max_new_tokens, **kwargs):
        for b in torch.nonzero(emit).flatten().tolist():
            out[b].append(int(tok[b]))
    return out
