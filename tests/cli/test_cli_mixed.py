"""CLI: mixed-precision weights (`--weight-bits`, `--weight-budget`), end to end on a tiny HF
llama folder, and `mcomp inspect` showing the plan."""
from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import mcomp, one_line_error, tiny_hf  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def mixed_artifact(tiny_hf, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("mixed")
    r = mcomp("optimize", tiny_hf, "--weight-bits", "3.5", "--out", d / "art", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "quantize_weights_mixed" in r.stdout and "mixed plan (rtn, kl-scaled sensitivity" in r.stdout
    return d


def test_weight_bits_end_to_end_and_inspect(mixed_artifact):
    r = mcomp("inspect", mixed_artifact / "art", "--json", cwd=mixed_artifact)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    mixed = info["mixed"]
    assert mixed["source"] == "manifest" and mixed["method"] == "rtn"
    assert mixed["predicted_weight_bytes"] == mixed["measured_weight_bytes"] == info["totals"]["weight_bytes"]
    assert mixed["avg_bits"] <= 3.5 and mixed["target"]["avg_bits"] == 3.5
    assert len(mixed["plan"]) == 8                     # 2 layers × qkv, o, gate_up, down
    by_node = {l["node"]: l["format"] for l in info["linears"]}
    assert all(by_node[row["node"]] == row["format"] for row in mixed["plan"])
    r = mcomp("inspect", mixed_artifact / "art", cwd=mixed_artifact)
    assert r.returncode == 0, r.stderr
    assert "mixed-precision plan (rtn)" in r.stdout and "qkv_proj" in r.stdout
    assert "predicted" in r.stdout and "bits/weight" in r.stdout


def test_second_plan_uses_cached_sensitivity(mixed_artifact, tiny_hf):  # noqa: F811
    """Same model and calibration text, another budget: the sensitivity comes from the cache."""
    r = mcomp("optimize", tiny_hf, "--weight-budget", "150KB", "--out", mixed_artifact / "b",
              "--json", cwd=mixed_artifact)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["report"]
    st = rep["passes"][-1]["stats"]
    assert st["sensitivity"]["cached"] is True
    assert st["measured_weight_bytes"] <= 150_000 == st["target"]["budget_bytes"]


def test_budget_errors_are_one_line(tiny_hf, tmp_path):  # noqa: F811
    r = mcomp("optimize", tiny_hf, "--weight-budget", "1KB", "--out", tmp_path / "x", cwd=tmp_path)
    one_line_error(r, 2, "weight budget 1,000 B is unreachable", "smallest plan is")
    r = mcomp("optimize", tiny_hf, "--weight-budget", "1MB", "--weight-bits", "3", cwd=tmp_path)
    one_line_error(r, 2, "not both")
    r = mcomp("optimize", tiny_hf, "--weights", "rtn:4:g128", "--weight-bits", "3", cwd=tmp_path)
    one_line_error(r, 2, "uniform plan")
    r = mcomp("optimize", tiny_hf, "--weights", "rtn", cwd=tmp_path)
    one_line_error(r, 2, "--weight-budget or --weight-bits")
    r = mcomp("optimize", tiny_hf, "--weight-budget", "12 parsecs", cwd=tmp_path)
    one_line_error(r, 2, "--weight-budget '12 parsecs'")
