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
