"""Synthetic passkey retrieval (Landmark Attention / LongLoRA prompt) as a long-context test of
KV representations.

A prompt of exactly `length - answer_tokens` model tokens (BOS included):

    BOS There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    it. I will quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key is 12345. Remember it. 12345 is the pass key.          ← at `depth` of the filler
    The grass is green. ...
    What is the pass key? The pass key is

then `answer_tokens` greedy tokens; the first run of digits in them is the answer.

KV compression must be *seen* (docs/architecture.md, "Measuring quality"): a lossy cache such as
KIVI lets a multi-token chunk attend to itself in full precision, so a prompt prefilled in one
chunk would answer without ever reading the quantized store. Here only the haystack (everything
up to the question) is prefilled as one chunk; the question is then fed token by token through
decode steps, and the answer generated greedily, so every step that can retrieve the key attends
over the cache as stored (KIVI: the quantized store plus its fp residual window; whether the
needle sat in the quantized store when the first answer token was chosen is reported per trial).

Shared prefill: a prefill chunk attends in full precision whatever the KV representation, so the
per-layer K/V it produces are the same for every scheme. With `share_prefill` (the default) the
haystack is prefilled once per trial with dense fp32 caches, and each scheme's caches are filled
by loading those K/V (`KVCache.load`, which puts keys in KIVI's rotated basis with `:hk`; V rotated
like the rotate_v pass folds it into the weights with `:hv`). That is what a scheme's own prefill
would store, up to float rounding (tests/runtime/test_passkey.py checks it against the unshared
path); schemes whose preparation does anything else fall back to their own prefill.

Lengths count model tokens: the prompt plus the answer budget, so a length never exceeds the
model's positions. Trials use depths spread over 0.1..0.9 and seeded random 5-digit keys (one
key per (seed, length, trial), so adding a length does not change the others).
"""
from __future__ import annotations

import copy
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import fx

from ..compiler import ir
from ..compiler.spec import KVSpec, ModelSpec
from ..errors import ConfigError
from .generate import select_next
from .kvcache import AttentionState

if TYPE_CHECKING:
    from .session import Session

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
#: fewest filler tokens a prompt may have (below that it is not a haystack)
MIN_FILLER = 32
#: scheme name meaning "the target's own KV specs, unchanged"
TARGET = "target"

#: progress(done, total, text): units are prefills and scheme answers
Progress = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------- config

def default_depths(trials: int) -> tuple[float, ...]:
    """Needle depths of `trials` trials: evenly spread over 0.1..0.9 (0.5 for a single trial)."""
    if trials == 1:
        return (0.5,)
    return tuple(round(0.1 + 0.8 * i / (trials - 1), 4) for i in range(trials))


def trial_key(seed: int, length: int, trial: int) -> str:
    """The 5-digit passkey of one trial (deterministic in seed, length, trial)."""
    return str(random.Random(f"passkey:{seed}:{length}:{trial}").randint(10000, 99999))


@dataclass(frozen=True)
class PasskeyConfig:
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    #: `--kv` shorthands (dense, kivi4, kivi2:hv:hk:s16, ...) or "target" (the model's own KV)
    schemes: tuple[str, ...] = ("dense", "kivi4")
    trials: int = 5
    seed: int = 0
    answer_tokens: int = 8
    #: needle depth per trial (fraction of the filler before the needle); () = default_depths
    depths: tuple[float, ...] = ()
    #: the scheme every other one is compared with trial by trial (added if missing)
    reference: str = "dense"
    share_prefill: bool = True

    def __post_init__(self):
        if not self.lengths:
            raise ConfigError("passkey: give at least one length")
        if any(int(n) != n or n < 1 for n in self.lengths):
            raise ConfigError(f"passkey: lengths must be positive token counts, got {self.lengths}")
        if self.trials < 1:
            raise ConfigError(f"passkey: trials must be >= 1, got {self.trials}")
        if self.answer_tokens < 6:
            raise ConfigError(f"passkey: answer_tokens must be >= 6 (a space and 5 digits), got "
                              f"{self.answer_tokens}")
        if self.depths and len(self.depths) != self.trials:
            raise ConfigError(f"passkey: {len(self.depths)} depths for {self.trials} trials")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"passkey: depths must be in [0, 1], got {self.depths}")
        if not self.schemes:
            raise ConfigError("passkey: give at least one KV scheme")
        schemes = tuple(dict.fromkeys(s.strip() for s in self.schemes))
        if self.reference not in schemes:
            schemes = (self.reference, *schemes)
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))

    def trial_depths(self) -> tuple[float, ...]:
        return self.depths or default_depths(self.trials)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"] = list(self.trial_depths())
        return d


# ----------------------------------------------------------------------------- prompt

@dataclass(frozen=True)
class PasskeyPrompt:
    """Token ids of one trial: `haystack` is prefilled as one chunk, `question` is fed token by
    token. The needle occupies haystack columns [needle_start, needle_end)."""

    key: str
    depth: float
    haystack: tuple[int, ...]
    question: tuple[int, ...]
    needle_start: int
    needle_end: int
    filler_tokens: int

    @property
    def n_tokens(self) -> int:
        return len(self.haystack) + len(self.question)


class PromptBuilder:
    """Builds passkey prompts of exact token lengths for one tokenizer.

    Segments are tokenized separately and concatenated (each after a newline or a space, so a
    byte-level BPE splits them where the joint text would): the filler is a cycle of sentences
    whose token counts are known, and the last filler sentence is cut at a token boundary to
    hit the length exactly."""

    def __init__(self, encode: Callable[[str], list[int]], bos_id: int | None):
        self.encode = encode
        self.bos = [bos_id] if bos_id is not None else []
        self.intro = self.encode(INTRO)
        self.question = self.encode("\n" + QUESTION)
        self._sent = {(i, lead): self.encode(lead + s)
                      for i, s in enumerate(FILLER) for lead in ("\n", " ")}

    def needle(self, key: str) -> list[int]:
        return self.encode("\n" + NEEDLE.format(key=key))

    def fixed_tokens(self, key: str = "12345") -> int:
        """Tokens of everything but the filler (BOS, intro, needle, question)."""
        return len(self.bos) + len(self.intro) + len(self.needle(key)) + len(self.question)

    def min_length(self, answer_tokens: int) -> int:
        # 5-digit keys of this tokenizer all take about as many tokens as 12345; 4 spare tokens
        return self.fixed_tokens() + 4 + MIN_FILLER + answer_tokens

    def _filler(self, start: int, budget: int, cap: int | None = None) -> tuple[list[int], int]:
        """Filler sentences from cycle index `start`. cap None: exactly `budget` tokens (whole
        sentences, the last one cut at a token boundary). Else as many whole sentences as bring
        the count nearest to `budget`, never above `cap`. Returns (ids, next cycle index)."""
        ids: list[int] = []
        i = start
        while len(ids) < budget:
            s = self._sent[(i % len(FILLER), "\n" if not ids else " ")]
            if len(ids) + len(s) <= budget:
                ids += s
                i += 1
                continue
            if cap is None:
                ids += s[:budget - len(ids)]
            elif (budget - len(ids) > len(ids) + len(s) - budget         # nearer with it
                  and len(ids) + len(s) <= cap):
                ids += s
                i += 1
            break
        return ids, i

    def build(self, length: int, depth: float, key: str, answer_tokens: int) -> PasskeyPrompt:
        """The prompt of one trial: exactly `length - answer_tokens` tokens."""
        needle = self.needle(key)
        fixed = len(self.bos) + len(self.intro) + len(needle) + len(self.question)
        filler = length - answer_tokens - fixed
        if filler < MIN_FILLER:
            raise ConfigError(f"passkey length {length} is too short: the prompt needs "
                              f"{fixed + answer_tokens} tokens before any filler (minimum length "
                              f"{self.min_length(answer_tokens)})")
        before, nxt = self._filler(0, round(depth * filler), cap=filler)
        after, _ = self._filler(nxt, filler - len(before))
        head = self.bos + self.intro + before
        haystack = head + needle + after
        return PasskeyPrompt(key=key, depth=depth, haystack=tuple(haystack),
                             question=tuple(self.question), needle_start=len(head),
                             needle_end=len(head) + len(needle), filler_tokens=filler)


def parse_answer(text: str) -> str | None:
    """The first run of digits in a generated answer, or None."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


# ----------------------------------------------------------------------------- running

def dense_spec(spec: ModelSpec) -> ModelSpec:
    """`spec` with every layer's KV dense fp32 (the cache the shared prefill writes)."""
    for i in range(spec.n_layers):
        spec = spec.with_layer(i, kv=KVSpec())
    return spec


def prefill(gm: fx.GraphModule, spec: ModelSpec, ids: Sequence[int]) -> AttentionState:
    """One prefill chunk of `ids` (batch 1, positions 0..T-1) into fresh caches built from
    `spec`; the logits are not computed beyond the last position and not returned."""
    x = torch.tensor([list(ids)], dtype=torch.long)                   # (1, T)
    pos = torch.arange(x.shape[1])[None]                              # (1, T)
    state = AttentionState(spec, 1, model=gm)
    state.last_logits_only = True
    with torch.inference_mode():
        state.begin(pos)
        gm(x, pos, state)
    return state


def load_prefill(src: AttentionState, spec: ModelSpec,
                 v_rotations: Sequence[torch.Tensor | None] | None = None) -> AttentionState:
    """Fresh caches built from `spec` holding what `src` (dense caches after one prefill chunk)
    holds, appended as one chunk: what a prefill with `spec`'s caches would have stored.

    Each cache maps keys to its own basis (`KVCache.load`; KIVI with a key rotation);
    `v_rotations[layer]` (D, D) maps V to the basis of a model whose V projections were rotated
    (the rotate_v pass)."""
    state = AttentionState(spec, src.batch)
    state.last_logits_only = True
    with torch.inference_mode():
        state.begin(src.key_pos, src.key_valid)
        for layer, (s, d) in enumerate(zip(src.caches, state.caches)):
            k, v = s.k[:, :, :s.length], s.v[:, :, :s.length]         # (B, H, T, D)
            rot = v_rotations[layer] if v_rotations is not None else None
            if rot is not None:
                v = (v.double() @ rot.double()).to(v.dtype)
            d.load(k, v)                                             # (k rotation: the cache's)
    return state


def feed(gm: fx.GraphModule, state: AttentionState, ids: Sequence[int]) -> torch.Tensor:
    """Feed `ids` one token per forward (decode steps through the cache, batch 1) at the
    positions after what `state` holds; returns the last step's logits (V,)."""
    if not ids:
        raise ConfigError("feed needs at least one token")
    logits = None
    for t in ids:
        p = int(state.key_pos[0, -1]) + 1 if state.length else 0
        pos = torch.tensor([[p]])
        with torch.inference_mode():
            state.begin(pos)
            logits = gm(torch.tensor([[int(t)]]), pos, state)[0, -1]  # (V,)
    return logits


def greedy(gm: fx.GraphModule, state: AttentionState, logits: torch.Tensor, max_new_tokens: int,
           eos_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation from `logits` (V,) (the last fed token's) through decode steps; EOS
    ends it (not included)."""
    out: list[int] = []
    for i in range(max_new_tokens):
        tok = int(select_next(logits[None], 0.0, 1.0, None)[0])
        if tok in eos_ids:
            break
        out.append(tok)
        if i + 1 < max_new_tokens:
            logits = feed(gm, state, [tok])
    return out


def needle_quantized(state: AttentionState, start: int, end: int) -> bool | None:
    """Whether every lossy (quantizing) cache holds the needle columns [start, end) in its
    quantized store (not in an fp sink or residual window); None if no cache quantizes."""
    seen = None
    for c in state.caches:
        span = c.quantized_span()
        if span is None:
            continue
        lo, hi = span
        inside = start >= lo and end <= hi
        seen = inside if seen is None else seen and inside
    return seen


def decode_paths(state: AttentionState) -> list[str]:
    """The distinct `last_path`s of the caches that report one (KIVI: kernel/reference/prefill)."""
    return sorted({p for c in state.caches if (p := getattr(c, "last_path", None))})


@dataclass(frozen=True)
class PreparedScheme:
    name: str
    gm: fx.GraphModule            # the session's graph, or a rewritten copy (`:hv`)
    spec: ModelSpec               # the KV specs this scheme's caches are built from
    shareable: bool               # may start from the shared dense prefill (load_prefill)
    v_rotations: list[torch.Tensor] | None   # per layer (D, D) V rotation of a `:hv` rewrite
    label: str


def prepare_scheme(gm: fx.GraphModule, scheme: str, tokenizer=None) -> PreparedScheme:
    """The graph and spec a scheme runs with. Spec-only schemes share `gm` (the graph does not
    read KV specs; the AttentionState does); a weight rewrite (`:hv`) or a calibrated kind
    (its state tensors live in the graph's modules) works on a deep copy."""
    from ..passes.assign_kv import AssignKV, kv_context, kv_passes
    from ..passes.rotate_v import RotateV

    if scheme == TARGET:
        spec = ir.get_spec(gm)
        labels = sorted({l.kv.label() for l in spec.layers})
        return PreparedScheme(scheme, gm, spec, True, None, f"target ({', '.join(labels)})")
    passes = kv_passes(scheme)                                   # ConfigError on bad shorthands
    rewrites = [p for p in passes if type(p) is not AssignKV]
    target = copy.deepcopy(gm) if rewrites else gm
    ctx = kv_context(passes, scheme, tokenizer)
    saved = ir.get_spec(gm)
    try:
        for p in passes:
            p.check(target)
            p.run(target, ctx)
        spec = ir.get_spec(target)
    finally:
        if target is gm:
            ir.set_spec(gm, saved)
    from .kv import KV_KINDS
    shareable = (all(isinstance(p, RotateV) or type(p) is not AssignKV and p.stage == "kv"
                     for p in rewrites)
                 and all(KV_KINDS.get(l.kv.kind).loads_kv for l in spec.layers))
    v_rot = None
    if any(isinstance(p, RotateV) for p in rewrites):
        rv = next(p for p in rewrites if isinstance(p, RotateV))
        v_rot = [rv.rotation(l.head_dim) for l in spec.layers]
    return PreparedScheme(scheme, target, spec, shareable, v_rot, scheme)


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class PasskeyAnswer:
    ids: tuple[int, ...]
    text: str
    answer: str | None            # parsed digits
    correct: bool
    #: every quantizing cache held the needle in its quantized store at the first answer token
    needle_quantized: bool | None
    paths: tuple[str, ...]        # cache decode paths of the last step (KIVI: kernel/reference)
    #: the first answer token's 3 most likely tokens and their log-probabilities (how close a
    #: call the answer was)
    first_top: tuple[tuple[str, float], ...]
    seconds: float


@dataclass(frozen=True)
class PasskeyTrial:
    length: int
    trial: int
    depth: float
    key: str
    prompt_tokens: int
    needle_start: int
    needle_end: int
    prefill_seconds: float
    answers: dict[str, PasskeyAnswer]


@dataclass(frozen=True)
class PasskeyReport:
    config: PasskeyConfig
    labels: dict[str, str]        # scheme → label (target schemes name their KV specs)
    trials: tuple[PasskeyTrial, ...]
    seconds: float

    def summary(self) -> list[dict]:
        """One row per (length, scheme): accuracy, agreement with the reference scheme."""
        ref = self.config.reference
        rows = []
        for n in self.config.lengths:
            ts = [t for t in self.trials if t.length == n]
            for s in self.config.schemes:
                ans = [t.answers[s] for t in ts]
                same = [t.answers[s].answer == t.answers[ref].answer for t in ts]
                q = [a.needle_quantized for a in ans if a.needle_quantized is not None]
                rows.append({
                    "length": n, "scheme": s, "label": self.labels.get(s, s), "trials": len(ts),
                    "correct": sum(a.correct for a in ans),
                    "accuracy": sum(a.correct for a in ans) / len(ts) if ts else 0.0,
                    "matches_reference": sum(same), "all_match_reference": all(same),
                    "same_tokens_as_reference": sum(t.answers[s].ids == t.answers[ref].ids
                                                    for t in ts),
                    "needle_quantized": sum(q) if q else None,
                    "seconds": sum(a.seconds for a in ans)})
        return rows

    def matches_reference(self, scheme: str) -> bool:
        """Whether `scheme` gave the reference's answer on every trial at every length."""
        return all(t.answers[scheme].answer == t.answers[self.config.reference].answer
                   for t in self.trials)

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "labels": self.labels,
                "summary": self.summary(),
                "matches_reference": {s: self.matches_reference(s) for s in self.config.schemes},
                "trials": [asdict(t) for t in self.trials], "seconds": round(self.seconds, 2)}


# ----------------------------------------------------------------------------- driver

def check_lengths(spec: ModelSpec, builder: PromptBuilder, config: PasskeyConfig) -> None:
    limit = spec.learned_positions or spec.max_positions
    for n in config.lengths:
        if n > limit:
            raise ConfigError(f"passkey length {n} exceeds the model's {limit} positions")
        if n < builder.min_length(config.answer_tokens):
            raise ConfigError(f"passkey length {n} is too short: the prompt needs at least "
                              f"{builder.min_length(config.answer_tokens)} tokens")


def run_passkey(session: "Session", config: PasskeyConfig = PasskeyConfig(),
                progress: Progress | None = None) -> PasskeyReport:
    """Passkey retrieval of `session` (a runtime Session with a tokenizer) under each KV scheme
    of `config` at each length; see the module docstring for the protocol."""
    tok = session._require_tokenizer()
    builder = PromptBuilder(lambda s: tok.encode(s, add_bos=False), session.bos_id)
    check_lengths(session.spec, builder, config)
    gm = session.gm
    schemes = {s: prepare_scheme(gm, s, tok) for s in config.schemes}    # validates every scheme first
    share = config.share_prefill and any(s.shareable for s in schemes.values())
    base_spec = dense_spec(ir.get_spec(gm))
    depths = config.trial_depths()
    per_trial = len(schemes) + (1 if share else 0) + sum(
        1 for s in schemes.values() if not (share and s.shareable))
    total = len(config.lengths) * config.trials * per_trial
    done = 0

    def tick(text: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, text)

    if progress is not None:
        progress(0, total, "")
    t_all = time.perf_counter()
    trials = []
    for n in config.lengths:
        for i in range(config.trials):
            prompt = builder.build(n, depths[i], trial_key(config.seed, n, i), config.answer_tokens)
            where = f"{n} tokens, trial {i + 1}/{config.trials}"
            t0 = time.perf_counter()
            base = prefill(gm, base_spec, prompt.haystack) if share else None
            t_prefill = time.perf_counter() - t0
            if share:
                tick(f"{where}: prefill")
            answers = {}
            for name, sc in schemes.items():
                t0 = time.perf_counter()
                if share and sc.shareable:
                    state = load_prefill(base, sc.spec, sc.v_rotations)
                else:
                    state = prefill(sc.gm, sc.spec, prompt.haystack)
                    tick(f"{where}: {name} prefill")
                logits = feed(sc.gm, state, prompt.question)
                inside = needle_quantized(state, prompt.needle_start, prompt.needle_end)
                lp, top = torch.log_softmax(logits.float(), -1).topk(3)
                first_top = tuple((tok.decode([int(i)]), round(float(v), 4))
                                  for v, i in zip(lp, top))
                ids = greedy(sc.gm, state, logits, config.answer_tokens, session.eos_ids)
                text = tok.decode(ids)
                got = parse_answer(text)
                answers[name] = PasskeyAnswer(
                    ids=tuple(ids), text=text, answer=got, correct=got == prompt.key,
                    needle_quantized=inside, paths=tuple(decode_paths(state)), first_top=first_top,
                    seconds=round(time.perf_counter() - t0, 3))
                del state
                tick(f"{where}: {name}")
            del base
            trials.append(PasskeyTrial(
                length=n, trial=i, depth=prompt.depth, key=prompt.key,
                prompt_tokens=prompt.n_tokens, needle_start=prompt.needle_start,
                needle_end=prompt.needle_end, prefill_seconds=round(t_prefill, 3), answers=answers))
    return PasskeyReport(config=config, labels={s: sc.label for s, sc in schemes.items()},
                         trials=tuple(trials), seconds=time.perf_counter() - t_all)


def parse_lengths(text: str) -> tuple[int, ...]:
    """`1024,2048` or `1k,2k,4k,8k` (k = 1024) → token counts; ConfigError otherwise."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        m = re.fullmatch(r"(\d+)(k?)", p)
        if not m or int(m.group(1)) == 0:
            raise ConfigError(f"--passkey: '{part.strip()}' is not a token count (expected e.g. "
                              "1024,2048 or 1k,2k)")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return tuple(dict.fromkeys(out))
