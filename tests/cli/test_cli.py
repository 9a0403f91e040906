"""CLI: every bad input is one line on stderr with the documented exit code; happy paths work.

Runs the real `mcomp` entry point in a subprocess (what a user types), on a tiny HF llama folder
built in code, so it needs no real checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")


def mcomp(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MCOMP_CACHE=str(Path(cwd or ".") / ".cache"))
    return subprocess.run([sys.executable, "-m", "mcomp.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr                       # one line, no traceback
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny random llama checkpoint with a real (byte-level BPE) tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from mcomp import data
    d = tmp_path_factory.mktemp("tiny_hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([data.calibration_text()[:20000]], trainer)
    tok.save(str(d / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def artifact(tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "int4"
    r = mcomp("optimize", tiny_hf, "--weights", "rtn:4:g32", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "quantize_weights_rtn" in r.stdout and "artifact:" in r.stdout
    return out


def test_optimize_inspect_eval_run(artifact, tiny_hf):
    r = mcomp("inspect", artifact, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["totals"]["weight_bytes"] > 0 and info["totals"]["kv_bytes_per_token"] == 2 * 2 * (2 * 16) * 4  # layers·(K,V)·kv_dim·fp32
    assert all("rtn:int4:g32:asym" in l["schemes"] for l in info["layers"])
    r = mcomp("eval", artifact, "--max-tokens", "400", "--ctx", "64", "--base", tiny_hf, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tokens_scored"] == 6 * 63 and res["ppl"] > 1 and 0 <= res["kld"] and 0 <= res["top1_agreement"] <= 1
    r = mcomp("run", artifact, "--prompt", "It is a truth", "-n", "5", "--seed", "0", "-t", "0.8")
    assert r.returncode == 0 and r.stdout.startswith("It is a truth"), r.stderr


def test_truncated_weights(artifact, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    one_line_error(mcomp("run", bad, "--prompt", "x"), 3, "truncated", "model.safetensors")


def test_edited_manifest(artifact, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["model"]["layers"][0]["ffn_dim"] = 64
    (bad / "manifest.json").write_text(json.dumps(m))
    one_line_error(mcomp("inspect", bad), 3, "manifest.json")


def test_unknown_architecture(tmp_path):
    d = tmp_path / "mamba"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    one_line_error(mcomp("optimize", d), 3, "unsupported architecture 'mamba'", "llama")


def test_missing_calibration_file(tiny_hf, tmp_path):
    one_line_error(mcomp("optimize", tiny_hf, "--calib", tmp_path / "nope.txt", "--out", tmp_path / "o"),
                   2, "nope.txt", "does not exist")
    assert not (tmp_path / "o").exists()                    # nothing half-written


def test_bad_flags_and_sources(tiny_hf, tmp_path):
    one_line_error(mcomp("optimize", tiny_hf, "--weights", "rtn:5", "--out", tmp_path / "o"), 2, "bits=5")
    one_line_error(mcomp("optimize", tiny_hf, "--preset", "int5"), 2, "unknown preset", "int4")
    one_line_error(mcomp("run", tmp_path / "missing", "--prompt", "x"), 3, "not found")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    one_line_error(mcomp("inspect", junk), 3, "neither a HF folder nor a GGUF")
    r = mcomp("optimize", "--preset", "int4", "--recipe", "x.toml")
    assert r.returncode == 2 and "not both" in r.stderr


def test_out_refuses_foreign_directory(tiny_hf, tmp_path):
    d = tmp_path / "home"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    one_line_error(mcomp("optimize", tiny_hf, "--out", d), 3, "not an mcomp artifact")
    assert (d / "precious.txt").read_text() == "keep me"


def test_debug_shows_traceback(tmp_path):
    r = mcomp("--debug", "run", tmp_path / "missing", "--prompt", "x")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bench_anchors_bad_input(tmp_path, tiny_hf):
    """anchors need a built-in model (its GGUF is llama.cpp's input): a folder is refused in one
    line, before anything is compiled or run."""
    r = mcomp("bench", "anchors", "--model", tiny_hf, "--no-write", cwd=tmp_path)
    if "llama-cpp-python" in r.stderr:          # not installed here: that is the one-line error
        one_line_error(r, 2, "llama-cpp-python", "docs/benchmarks.md")
    else:
        one_line_error(r, 2, "built-in model", "smollm2-135m")
