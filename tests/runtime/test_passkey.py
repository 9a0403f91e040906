"""Passkey retrieval (mcomp.runtime.passkey) on a tiny random model: prompt construction, the
answer parser, that the question really goes through the caches' decode path, that the shared
prefill stores what each scheme's own prefill would, and the CLI's errors.

Tolerance: shared vs own prefill, logits of the first answer token, atol = rtol = 1e-4 (logits
of magnitude ~1 here). The two paths store the same K/V up to float rounding (SDPA with an
explicit vs an is_causal mask; V rotated in float64 vs through rotated fp32 weights), ~1e-7,
which 4- and 8-bit codes absorb; a key quantized or rotated differently, or a V not rotated,
moves logits by > 1e-2.
"""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mcomp.errors import ConfigError
from mcomp.runtime import kernels
from mcomp.runtime import passkey as pk
from mcomp.runtime.session import Session
from mcomp.runtime.tokenizer import Tokenizer

from helpers import tiny_gm, tiny_spec

SMALL_KIVI = "kivi4:g8:r16"          # small group / residual so short prompts get quantized


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the prompt's own sentences (digits stay single bytes)."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [pk.INTRO, " ".join(pk.FILLER), pk.NEEDLE.format(key="key"), pk.QUESTION] * 4
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}))
    return Tokenizer.from_dir(d)


@pytest.fixture(scope="module")
def session(tokenizer):
    spec = tiny_spec(vocab=tokenizer.vocab_size, max_positions=1024)
    return Session(tiny_gm(spec, std=0.1), tokenizer)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return pk.PromptBuilder(lambda s: tokenizer.encode(s, add_bos=False), 1)


# ----------------------------------------------------------------------------- prompts


def test_depths_and_keys_are_deterministic():
    assert pk.default_depths(5) == (0.1, 0.3, 0.5, 0.7, 0.9)
    assert pk.default_depths(1) == (0.5,)
    keys = [pk.trial_key(0, 1024, i) for i in range(5)]
    assert keys == [pk.trial_key(0, 1024, i) for i in range(5)]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) == 5
    assert pk.trial_key(1, 1024, 0) != keys[0] and pk.trial_key(0, 2048, 0) != keys[0]


@pytest.mark.parametrize("length", [pk.MIN_FILLER + 160, 333, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_length_depth_and_text(builder, tokenizer, length, depth):
    p = builder.build(length, depth, "48213", answer_tokens=8)
    assert p.n_tokens == length - 8                                  # exact
    assert p.haystack[0] == 1                                        # BOS
    needle = tokenizer.decode(list(p.haystack[p.needle_start:p.needle_end]))
    assert needle == "\n" + pk.NEEDLE.format(key="48213")
    # needle at the requested share of the filler, to a sentence boundary (< one sentence away)
    before = p.needle_start - 1 - len(builder.intro)
    longest = max(len(builder.encode(" " + s)) for s in pk.FILLER)
    assert abs(before - depth * p.filler_tokens) < longest
    text = tokenizer.decode(list(p.haystack) + list(p.question))
    assert text.startswith(pk.INTRO + ("\nThe grass is green." if depth > 0.05 else "\nThe pass"))
    assert text.endswith("\n" + pk.QUESTION)
    assert text.count("48213") == 2 and pk.FILLER[3] in text


def test_prompt_too_short(builder):
    with pytest.raises(ConfigError, match="too short"):
        builder.build(builder.min_length(8) - pk.MIN_FILLER, 0.5, "12345", 8)
    builder.build(builder.min_length(8), 0.5, "12345", 8)             # the minimum works


@pytest.mark.parametrize("text,want", [(" 48213.\n", "48213"), (" is 48213. Remember", "48213"),
                                       (" 4821 3", "4821"), (" the pass key.", None), ("", None)])
def test_parse_answer(text, want):
    assert pk.parse_answer(text) == want


def test_parse_lengths():
    assert pk.parse_lengths("1024, 2k,4K,2048") == (1024, 2048, 4096)
    for bad in ("1024,abc", "0", "", "1.5k", "-5"):
        with pytest.raises(ConfigError, match="--passkey"):
            pk.parse_lengths(bad)


def test_config_validation():
    cfg = pk.PasskeyConfig(lengths=(256,), schemes=("kivi4",), trials=3)
    assert cfg.schemes == ("dense", "kivi4") and cfg.trial_depths() == (0.1, 0.5, 0.9)
    for kw, msg in [(dict(lengths=()), "length"), (dict(trials=0), "trials"),
                    (dict(answer_tokens=3), "answer_tokens"), (dict(trials=2, depths=(0.5,)), "depths"),
                    (dict(trials=1, depths=(1.5,)), "depths"), (dict(schemes=()), "scheme")]:
        with pytest.raises(ConfigError, match=msg):
            pk.PasskeyConfig(**kw)


# ----------------------------------------------------------------------------- cache paths


def _scheme_state(session, prompt, scheme, share):
    sc = pk.prepare_scheme(session.gm, scheme)
    if share:
        base = pk.prefill(session.gm, pk.dense_spec(session.spec), prompt.haystack)
        return sc, pk.load_prefill(base, sc.spec, sc.v_rotations)
    return sc, pk.prefill(sc.gm, sc.spec, prompt.haystack)


@pytest.mark.parametrize("reference", [False, True])
def test_question_is_answered_through_the_decode_path(session, builder, reference):
    prompt = builder.build(320, 0.1, "48213", 8)
    sc, state = _scheme_state(session, prompt, SMALL_KIVI, share=False)
    assert pk.decode_paths(state) == ["prefill"]            # the haystack was one chunk
    if reference:
        with kernels.reference_mode():
            pk.feed(sc.gm, state, prompt.question)
        assert pk.decode_paths(state) == ["reference"]
    else:
        pk.feed(sc.gm, state, prompt.question)
        assert pk.decode_paths(state)[0] in ("kernel", "reference")
        assert "prefill" not in pk.decode_paths(state)
    assert state.length == prompt.n_tokens
    assert pk.needle_quantized(state, prompt.needle_start, prompt.needle_end) is True
    # the needle at the very end of the haystack is still in the fp residual window
    late = builder.build(320, 1.0, "48213", 8)
    _, st = _scheme_state(session, late, SMALL_KIVI, share=True)
    pk.feed(sc.gm, st, late.question)
    assert pk.needle_quantized(st, late.needle_start, late.needle_end) is False
    _, dense = _scheme_state(session, prompt, "dense", share=True)
    assert pk.needle_quantized(dense, prompt.needle_start, prompt.needle_end) is None


@pytest.mark.parametrize("scheme", ["dense", SMALL_KIVI, "kivi8:g8:r16:hk:s4", "kivi8:g8:r16:hv:hk",
                                    "kivi4:g8:r16:hv"])
def test_shared_prefill_equals_own_prefill(session, builder, scheme):
    prompt = builder.build(300, 0.3, "70411", 8)
    sc, shared = _scheme_state(session, prompt, scheme, share=True)
    _, own = _scheme_state(session, prompt, scheme, share=False)
    assert shared.length == own.length
    a = pk.feed(sc.gm, shared, prompt.question)
    b = pk.feed(sc.gm, own, prompt.question)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if sc.v_rotations is not None:       # negative control: forgetting the V rotation shows
        base = pk.prefill(session.gm, pk.dense_spec(session.spec), prompt.haystack)
        wrong = pk.load_prefill(base, sc.spec, None)
        assert (pk.feed(sc.gm, wrong, prompt.question) - b).abs().max() > 1e-2


def test_prepare_scheme_leaves_the_session_alone(session):
    before = session.spec
    w = session.gm.state_dict()["layers.0.v_proj.weight"].clone()
    sc = pk.prepare_scheme(session.gm, "kivi2:hv:hk")
    assert session.gm.meta["mcomp.spec"] == before
    assert sc.gm is not session.gm and sc.spec.layers[0].kv.params.k_rotation == "hadamard"
    assert torch.equal(session.gm.state_dict()["layers.0.v_proj.weight"], w)
    assert not torch.equal(sc.gm.state_dict()["layers.0.v_proj.weight"], w)
    assert pk.prepare_scheme(session.gm, "kivi4").gm is session.gm
    with pytest.raises(ConfigError, match="--kv"):
        pk.prepare_scheme(session.gm, "kivi3")


# ----------------------------------------------------------------------------- driver


def test_run_passkey_report(session):
    cfg = pk.PasskeyConfig(lengths=(200, 300), schemes=(SMALL_KIVI, "kivi2:g8:r16:hv"), trials=2)
    seen = []
    rep = pk.run_passkey(session, cfg, progress=lambda d, n, t: seen.append((d, n)))
    assert seen[0] == (0, 16) and seen[-1] == (16, 16)   # 2 lengths · 2 trials · (prefill + 3)
    assert [(t.length, t.trial) for t in rep.trials] == [(200, 0), (200, 1), (300, 0), (300, 1)]
    for t in rep.trials:
        assert t.prompt_tokens == t.length - cfg.answer_tokens
        assert set(t.answers) == {"dense", SMALL_KIVI, "kivi2:g8:r16:hv"}
        for name, a in t.answers.items():
            assert len(a.ids) <= cfg.answer_tokens and a.correct == (a.answer == t.key)
            assert ("prefill" not in a.paths) and (a.paths == () if name == "dense" else True)
    rows = rep.summary()
    assert len(rows) == 6 and all(r["trials"] == 2 for r in rows)
    assert all(r["matches_reference"] == 2 for r in rows if r["scheme"] == "dense")
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["config"]["schemes"] == ["dense", SMALL_KIVI, "kivi2:g8:r16:hv"]
    assert d["matches_reference"]["dense"] is True
    # the unshared path gives the same answers
    own = pk.run_passkey(session, pk.PasskeyConfig(lengths=(200, 300), schemes=cfg.schemes,
                                                   trials=2, share_prefill=False))
    assert [{s: a.ids for s, a in t.answers.items()} for t in own.trials] == \
           [{s: a.ids for s, a in t.answers.items()} for t in rep.trials]


def test_run_passkey_bad_lengths(session):
    with pytest.raises(ConfigError, match="exceeds the model's 1024 positions"):
        pk.run_passkey(session, pk.PasskeyConfig(lengths=(512, 2048), trials=1))
    with pytest.raises(ConfigError, match="too short"):
        pk.run_passkey(session, pk.PasskeyConfig(lengths=(64,), trials=1))


def test_target_scheme_uses_the_models_own_kv(session):
    import copy

    from mcomp.passes.assign_kv import apply_kv_flag
    gm = copy.deepcopy(session.gm)
    apply_kv_flag(gm, SMALL_KIVI)
    s = Session(gm, session.tokenizer)
    rep = pk.run_passkey(s, pk.PasskeyConfig(lengths=(200,), schemes=(pk.TARGET,), trials=1))
    assert rep.labels[pk.TARGET] == "target (kivi-k4v4-g8-r16)"
    assert rep.trials[0].answers[pk.TARGET].paths[0] in ("kernel", "reference")
    assert rep.trials[0].answers["dense"].paths == ()


# ----------------------------------------------------------------------------- CLI


try:   # the CLI tests' tiny HF llama (needs transformers to build)
    from tests.cli.test_cli import mcomp, one_line_error, tiny_hf  # noqa: F401  (fixture)
except pytest.skip.Exception:
    @pytest.fixture(scope="module")
    def tiny_hf():
        pytest.skip("transformers is not installed")


def test_cli_passkey_errors_and_json(tiny_hf):  # noqa: F811
    hf = tiny_hf
    one_line_error(mcomp("eval", hf, "--kv", "kivi4", "--passkey", "1024,99999"), 2,
                   "passkey length 99999 exceeds the model's 2048 positions")
    one_line_error(mcomp("eval", hf, "--kv", "kivi4", "--passkey", "16"), 2, "too short")
    one_line_error(mcomp("eval", hf, "--passkey", "1k,abc"), 2, "--passkey: 'abc'")
    one_line_error(mcomp("eval", hf, "--kv", "kivi3", "--passkey", "256"), 2, "--kv")
    assert mcomp("eval", hf, "--passkey", "256", "--streaming").returncode == 2
    r = mcomp("eval", hf, "--kv", SMALL_KIVI, "--passkey", "256,320", "--passkey-trials", "2",
              "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["config"]["schemes"] == ["dense", SMALL_KIVI]
    assert [(row["length"], row["scheme"]) for row in res["summary"]] == [
        (256, "dense"), (256, SMALL_KIVI), (320, "dense"), (320, SMALL_KIVI)]
    r = mcomp("eval", hf, "--kv", SMALL_KIVI, "--passkey", "256", "--passkey-trials", "1")
    assert r.returncode == 0, r.stderr
    assert "answers equal the dense cache's on every trial" in r.stdout



def test_xquant_runs_passkey_with_its_own_prefill(session):
    """xquant stores the attention input, so it cannot be filled from the shared dense
    prefill (loads_kv = False): it prefills itself, and the needle span is reported."""
    sc = pk.prepare_scheme(session.gm, "xquant:2:g8:res16")
    assert not sc.shareable
    rep = pk.run_passkey(session, pk.PasskeyConfig(lengths=(200,), schemes=("xquant:2:g8:res16",),
                                                   trials=1))
    [t] = rep.trials
    a = t.answers["xquant:2:g8:res16"]
    from mcomp.runtime.kernels import xquant_attention as xa
    assert a.needle_quantized is not None
    assert a.paths == (("kernel",) if xa.available() else ("reference",))
