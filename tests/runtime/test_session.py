"""Runtime session on a tiny random model and a tiny tokenizer, both built in code.

Checks the KV-cache decode path against a full forward, left-padded batching against solo
generation, seeded sampling, the perplexity window protocol against a hand-written oracle,
compare() of a model with itself, and streaming detokenization.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mcomp.compiler import ir
from mcomp.compiler.spec import LayerSpec, ModelSpec, RopeSpec
from mcomp.errors import ConfigError
from mcomp.runtime import metrics
from mcomp.runtime.generate import left_pad, select_next
from mcomp.runtime.kvcache import AttentionState
from mcomp.runtime.session import Session, make_windows
from mcomp.runtime.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 like SmolLM2 (unk, bos, eos)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Anne Elliot walked along the cobb at Lyme, thinking of Captain Wentworth.",
    "Sir Walter Elliot never took up any book but the Baronetage.",
    "Café crème, naïve façade, Æsop — and a few emoji: 😀 🚀 ✨.",
    "It is a truth universally acknowledged that a single man in possession of a good fortune "
    "must be in want of a wife.",
]
TEXT = " ".join(CORPUS * 6)
WINDOW = 5  # sliding window smaller than the test sequences


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte-level BPE tokenizer folder (tokenizer.json + tokenizer_config.json)."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def tiny_spec(vocab: int, window: int | None = WINDOW) -> ModelSpec:
    """Two GQA layers (4 query heads over 2 KV heads); the second slides over `window` tokens."""
    rope = RopeSpec(theta=10000.0, dim=8)
    layers = (LayerSpec(n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, rope=rope),
              LayerSpec(n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, rope=rope,
                        window=window))
    return ModelSpec(family="llama", vocab_size=vocab, hidden_size=32, layers=layers,
                     tie_embeddings=False, max_positions=256, bos_token_id=1,
                     eos_token_ids=(2,), pad_token_id=0)


def random_gm(vocab: int, seed: int = 0, window: int | None = WINDOW):
    torch.manual_seed(seed)
    gm = ir.build(tiny_spec(vocab, window))
    with torch.no_grad():  # sharper logits: greedy has clear winners, sampling still varies
        gm.lm_head.weight.mul_(4.0)
    return gm


@pytest.fixture(scope="module")
def gm(tokenizer):
    return random_gm(tokenizer.vocab_size)


@pytest.fixture(scope="module")
def session(gm, tokenizer):
    return Session(gm, tokenizer)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_special_ids_and_roundtrip(tokenizer, tok_dir):
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.pad_id) == (1, (2,), 0)
    ids = tokenizer.encode(CORPUS[3])
    assert ids and ids[0] != 1
    assert tokenizer.encode(CORPUS[3], add_bos=True) == [1, *ids]
    assert tokenizer.decode(ids) == CORPUS[3]
    # the spec wins over the side files; generation_config adds end-of-turn ids
    spec = tiny_spec(tokenizer.vocab_size)
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    try:
        t = Tokenizer.from_dir(tok_dir, spec)
    finally:
        (tok_dir / "generation_config.json").unlink()
    assert t.eos_ids == (2, 5) and t.bos_id == 1


def test_stream_decoder_matches_full_decode_on_multibyte_text(tokenizer):
    ids = tokenizer.encode("naïve 😀 façade ✨ Wentworth")
    dec = tokenizer.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    # the emoji is split over several byte tokens: some pushes must have held text back
    assert sum(1 for p in pieces if p == "") >= 1


# ----------------------------------------------------------------------------- KV cache

def full_logits(gm, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids → (B, T, V) logits by plain causal attention, no cache."""
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.inference_mode():
        return gm(ids, pos, None)


def test_incremental_decode_matches_full_forward(gm):
    """Prefill 4 tokens, then 1, 3, then single tokens: every logit matches a full forward,
    including the sliding-window layer once the sequence is longer than its window."""
    torch.manual_seed(1)
    V, T = gm.meta["mcomp.spec"].vocab_size, 14
    ids = torch.randint(3, V, (2, T))
    ref = full_logits(gm, ids)                                      # (2, T, V)
    state = AttentionState(gm.meta["mcomp.spec"], batch=2)
    got, t = [], 0
    with torch.inference_mode():
        for n in (4, 1, 3, 1, 1, 1, 1, 1, 1):
            pos = torch.arange(t, t + n).expand(2, n)
            state.begin(pos, torch.ones(2, n, dtype=torch.bool))
            got.append(gm(ids[:, t:t + n], pos, state))
            t += n
    got = torch.cat(got, dim=1)
    assert t == T
    assert (got - ref).abs().max().item() <= 1e-4
    # the window matters on this sequence: a global-attention twin gives different logits late
    glob = random_gm(V, seed=0, window=None)
    assert (full_logits(glob, ids)[:, WINDOW + 1:] - ref[:, WINDOW + 1:]).abs().max() > 1e-3


def test_last_logits_only_prefill_matches_full_forward_and_keeps_cache(gm):
    """Generation's prefill projects only the last position: same last logits as a full
    forward, and the cache it leaves behind serves the next step identically."""
    torch.manual_seed(3)
    V, T = gm.meta["mcomp.spec"].vocab_size, 12
    ids = torch.randint(3, V, (2, T + 1))
    ref = full_logits(gm, ids)                                      # (2, T+1, V)
    state = AttentionState(gm.meta["mcomp.spec"], batch=2)
    state.last_logits_only = True
    with torch.inference_mode():
        pos = torch.arange(T).expand(2, T)
        state.begin(pos)
        first = gm(ids[:, :T], pos, state)
        state.begin(torch.full((2, 1), T))
        second = gm(ids[:, T:], torch.full((2, 1), T), state)
    assert first.shape == (2, 1, V)
    assert (first[:, 0] - ref[:, T - 1]).abs().max().item() <= 1e-4
    assert (second[:, 0] - ref[:, T]).abs().max().item() <= 1e-4
    roles = [n.meta["mcomp"].role for n in gm.graph.nodes if "mcomp" in n.meta]
    assert roles.count("logit_select") == 1


def test_left_padded_prefill_matches_unpadded(gm):
    torch.manual_seed(2)
    V = gm.meta["mcomp.spec"].vocab_size
    rows = [torch.randint(3, V, (n,)).tolist() for n in (9, 3, 6)]
    ids, pos, valid, lengths = left_pad(rows, pad_id=0)
    assert pos[1].tolist() == [0] * 6 + [0, 1, 2] and valid[1].tolist() == [False] * 6 + [True] * 3
    state = AttentionState(gm.meta["mcomp.spec"], batch=3)
    with torch.inference_mode():
        state.begin(pos, valid)
        out = gm(ids, pos, state)                                   # (3, 9, V)
    for b, r in enumerate(rows):
        alone = full_logits(gm, torch.tensor([r]))[0]               # (n, V)
        assert (out[b, 9 - len(r):] - alone).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- generation

PROMPTS = ["The quick brown fox", "Anne", "Sir Walter Elliot never took up any book"]


def test_batched_greedy_equals_solo(session):
    batched = session.generate_ids(session.encode_prompts(PROMPTS), max_new_tokens=12,
                                   stop_at_eos=False)
    for p, row in zip(PROMPTS, batched):
        solo = session.generate_ids(session.encode_prompts([p]), max_new_tokens=12,
                                    stop_at_eos=False)[0]
        assert row == solo and len(row) == 12
    assert len({tuple(r) for r in batched}) > 1  # rows are really different generations
    texts = session.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False)
    assert texts == [session.tokenizer.decode(r) for r in batched]


def test_cached_greedy_equals_recomputed_greedy(session, gm):
    """Oracle without a cache: re-run the whole sequence each step and take the argmax."""
    prompts = session.encode_prompts(PROMPTS)
    got = session.generate_ids(prompts, max_new_tokens=10, stop_at_eos=False)
    for p, row in zip(prompts, got):
        seq = list(p)
        for _ in range(10):
            seq.append(int(full_logits(gm, torch.tensor([seq]))[0, -1].argmax()))
        assert row == seq[len(p):]


def test_rows_stop_at_eos_without_disturbing_others(session):
    ids = session.encode_prompts(PROMPTS)
    free = session.generate_ids(ids, max_new_tokens=10, stop_at_eos=False)
    eos = free[0][3]  # pretend row 0's 4th token is EOS
    saved = session.eos_ids
    session.eos_ids = (eos,)
    try:
        stopped = session.generate_ids(ids, max_new_tokens=10)
    finally:
        session.eos_ids = saved
    assert stopped[0] == free[0][:free[0].index(eos)]
    for row_free, row_stop in zip(free[1:], stopped[1:]):
        cut = row_free.index(eos) if eos in row_free else len(row_free)
        assert row_stop == row_free[:cut]


def test_seeded_sampling_reproducible_and_seed_dependent(session):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, stop_at_eos=False)
    a = session.generate(PROMPTS, seed=123, **kw)
    b = session.generate(PROMPTS, seed=123, **kw)
    c = session.generate(PROMPTS, seed=7, **kw)
    assert a == b
    assert a != c
    greedy = session.generate(PROMPTS, max_new_tokens=16, stop_at_eos=False)
    assert a != greedy


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(select_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn
    assert int(select_next(logits, 0.0, 1.0, None)) == 0


def test_stream_concatenates_to_generate(session):
    pieces = list(session.stream(PROMPTS[0], max_new_tokens=15, stop_at_eos=False))
    assert "".join(pieces) == session.generate(PROMPTS[0], max_new_tokens=15, stop_at_eos=False)[0]
    assert session.last_stats.decode_steps == 14 and session.last_stats.new_tokens == 15


def test_prompt_bos_handling(session, tokenizer):
    anne = tokenizer.encode("Anne")
    assert session.encode_prompts(["Anne"], add_bos=True) == [[1, *anne]]
    assert session.encode_prompts(["", "Anne"], add_bos=False) == [[1], anne]  # empty → BOS
    assert session.generate([]) == []
    assert len(session.generate("", max_new_tokens=3, stop_at_eos=False)) == 1


def test_bad_sampling_arguments_raise(session):
    with pytest.raises(ConfigError):
        session.generate("Anne", temperature=-1.0)
    with pytest.raises(ConfigError):
        session.generate("Anne", temperature=1.0, top_p=0.0)


# ----------------------------------------------------------------------------- evaluation

def oracle_nll(gm, ids: list[int], ctx: int, bos: int) -> tuple[float, int]:
    """Mean NLL the DESIGN way, written independently: BOS + ctx-1 text tokens per window."""
    total, count = 0.0, 0
    for w in range(len(ids) // (ctx - 1)):
        x = torch.tensor([[bos] + ids[w * (ctx - 1):(w + 1) * (ctx - 1)]])  # (1, ctx)
        logits = full_logits(gm, x)[0]                                        # (ctx, V)
        total += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
        count += ctx - 1
    return total / count, count


@pytest.mark.parametrize("ctx,batch_size", [(16, None), (16, 3), (33, 1)])
def test_perplexity_matches_oracle(session, gm, tokenizer, ctx, batch_size):
    ids = tokenizer.encode(TEXT)
    calls = []
    r = session.perplexity(TEXT, ctx=ctx, batch_size=batch_size,
                           progress=lambda d, n: calls.append((d, n)))
    nll, count = oracle_nll(gm, ids, ctx, bos=1)
    assert r.windows == len(ids) // (ctx - 1) and r.windows >= 2
    assert r.tokens_scored == r.windows * (ctx - 1) == count
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-5)
    assert calls[0] == (0, r.windows) and calls[-1] == (r.windows, r.windows)


def test_perplexity_max_tokens_and_ids_input(session, tokenizer):
    ids = tokenizer.encode(TEXT)
    r = session.perplexity(ids, ctx=16, max_tokens=50)          # 50 // 15 = 3 windows
    assert (r.windows, r.tokens_scored) == (3, 45)
    assert r.nll == pytest.approx(session.perplexity(ids[:45], ctx=16).nll, rel=1e-6)
    with pytest.raises(ConfigError):
        session.perplexity(ids[:10], ctx=16)                    # shorter than one window


def test_make_windows_layout():
    w = make_windows(list(range(10, 21)), ctx=4, bos_id=1)     # 11 tokens → 3 windows of 3
    assert w.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]


def test_compare_with_itself_and_with_another_model(session, gm, tokenizer):
    same = session.compare(session, TEXT, ctx=16, max_tokens=120)
    assert same["kld"] <= 1e-6 and same["top1_agreement"] == 1.0
    assert same["ppl"] == pytest.approx(same["base_ppl"]) and same["tokens_scored"] == 120
    other = Session(random_gm(tokenizer.vocab_size, seed=5), tokenizer)
    diff = other.compare(gm, TEXT, ctx=16, max_tokens=120)
    assert diff["kld"] > 1e-2 and diff["top1_agreement"] < 1.0
    assert diff["base_ppl"] == pytest.approx(same["ppl"], rel=1e-6)


def test_drift_metrics_against_direct_formulas():
    torch.manual_seed(3)
    ref = torch.randn(2, 5, 11)
    new = ref + 0.3 * torch.randn(2, 5, 11)
    d = metrics.drift(ref, new)
    p, q = ref.softmax(-1), new.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert d["kld"] == pytest.approx(kl, rel=1e-4)
    assert d["max_abs_logit"] == pytest.approx((ref - new).abs().max().item())
    assert d["top1"] == (ref.argmax(-1) == new.argmax(-1)).double().mean().item()
    assert d["tokens"] == 10
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    assert metrics.drift(ref, new, mask)["tokens"] == 2
    assert metrics.drift(ref, ref.clone())["kld"] == 0.0
