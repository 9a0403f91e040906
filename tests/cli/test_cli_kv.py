"""CLI for KV-cache quantization: `optimize --kv`, `eval --kv --streaming/--quantized-prefill`,
`bench attention`."""
from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import mcomp, one_line_error, tiny_hf  # noqa: F401  (fixture)

pytest.importorskip("transformers")


def test_optimize_kv_then_streaming_eval(tiny_hf, tmp_path):  # noqa: F811
    out = tmp_path / "kivi2"
    r = mcomp("optimize", tiny_hf, "--weights", "rtn:4:g32", "--kv", "kivi2:g8:r16", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "assign_kv" in r.stdout
    info = json.loads(mcomp("inspect", out, "--json").stdout)
    assert [l["kv"] for l in info["layers"]] == ["kivi", "kivi"]
    # 2 layers · 2 kv heads · (K 4 + 2·2·16/8 + V 4 + 2·2·2) bytes for head_dim 16, g8
    assert info["totals"]["kv_bytes_per_token"] == 2 * 2 * (4 + 8 + 4 + 8)
    r = mcomp("eval", out, "--streaming", "--ctx", "32", "--max-tokens", "62", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["mode"] == "stream" and res["tokens_scored"] == 62 and res["kld"] > 0
    assert res["kv"] == ["kivi-k2v2-g8-r16"]
    # any target, scheme applied at evaluation time; the fast prefill mode agrees with streaming
    r = mcomp("eval", out, "--kv", "kivi2:g8:r16", "--quantized-prefill", "--ctx", "32",
              "--max-tokens", "62", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ppl"] == pytest.approx(res["ppl"], rel=1e-3)


def test_bad_kv_flags(tiny_hf, tmp_path):  # noqa: F811
    one_line_error(mcomp("optimize", tiny_hf, "--kv", "kivi3", "--out", tmp_path / "x"), 2, "--kv")
    one_line_error(mcomp("eval", tiny_hf, "--kv", "kivi2:zz", "--streaming"), 2, "--kv")
    one_line_error(mcomp("eval", tiny_hf, "--kv", "xquant:3", "--streaming"), 2, "bits=3")
    one_line_error(mcomp("optimize", tiny_hf, "--kv", "xquant:2:r999", "--out", tmp_path / "y"),
                   2, "rank 999 exceeds")
    one_line_error(mcomp("eval", tiny_hf, "--kv", "lowrank:0.5", "--streaming"), 2, "xquant:BITS")
    one_line_error(mcomp("eval", tiny_hf, "--kv", "palu:1.5", "--streaming"), 2, "ratio must be in")
    r = mcomp("eval", tiny_hf, "--streaming", "--quantized-prefill")
    assert r.returncode == 2


def test_bench_attention_json(tmp_path):
    from mcomp.runtime.kernels import kivi_attention as ka
    if not ka.available():
        pytest.skip("KIVI kernel unavailable")
    md = tmp_path / "b.md"
    r = mcomp("bench", "attention", "--ctx", "512", "--kv", "kivi2", "--threads", "1",
              "--repeats", "2", "--out", md, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    row = res["results"][0]
    assert row["ctx"] == 512 and row["speedup_vs_sdpa_fp32"] > 0 and row["speedup_vs_sdpa_bf16"] > 0
    assert "<!-- bench:kv:begin -->" in md.read_text()


def test_bench_attention_layers_writes_its_own_section(tmp_path):
    from mcomp.runtime.kernels import kivi_attention as ka
    if not ka.available():
        pytest.skip("KIVI kernel unavailable")
    md = tmp_path / "b.md"
    r = mcomp("bench", "attention", "--ctx", "256", "--kv", "kivi4", "--threads", "1",
              "--repeats", "1", "--layers", "3", "--out", md, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["layers"] == 3 and res["simd"] in ("avx512", "generic")
    # KIVI4 error vs fp32 attention on random K/V: quantization error, far below the O(1) outputs
    assert 0 < res["results"][0]["max_abs_err_vs_fp32"] < 0.1
    text = md.read_text()
    assert "<!-- bench:kv-layers:begin -->" in text and "<!-- bench:kv:begin -->" not in text


def test_bench_decode_dense_vs_kivi(tiny_hf, tmp_path):  # noqa: F811
    md = tmp_path / "b.md"
    r = mcomp("bench", "decode", "--model", tiny_hf, "--ctx", "96", "--steps", "4", "--kv", "kivi2:g8:r16",
              "--threads", "1", "--out", md, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    dense, kivi = res["rows"]
    assert dense["label"].startswith("dense") and kivi["label"].startswith("kivi-k2v2-g8-r16")
    assert dense["context"] == kivi["context"] == 96
    assert kivi["kv_cache_bytes"] < dense["kv_cache_bytes"]
    assert dense["speedup_vs_dense"] == 1.0 and kivi["decode_tok_s"] > 0
    assert "<!-- bench:kv-decode:begin -->" in md.read_text()


def test_bench_decode_rejects_context_beyond_text(tiny_hf):  # noqa: F811
    r = mcomp("bench", "decode", "--model", tiny_hf, "--ctx", "10000000", "--no-write")
    one_line_error(r, 2, "exceeds the")


def test_bench_decode_rejects_bad_scheme_before_compiling(tiny_hf):  # noqa: F811
    r = mcomp("bench", "decode", "--model", tiny_hf, "--kv", "kivi3", "--no-write")
    one_line_error(r, 2, "kivi3")
