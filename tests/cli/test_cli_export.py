"""`mcomp optimize --emit` and `mcomp export`: the folders they write, what onnxruntime does with
them, and one-line errors with exit codes for every bad input. Real entry point, tiny HF llama."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from mcomp.codegen import load_artifact, verify_artifact  # noqa: E402
from mcomp.codegen.onnx.run import OrtDecoder  # noqa: E402
from mcomp.errors import ArtifactError  # noqa: E402
from mcomp.runtime.kernels import reference_mode  # noqa: E402
from tests.cli.test_cli import artifact, mcomp, one_line_error, tiny_hf  # noqa: E402,F401

IDS = [1, 40, 41, 42, 100, 7, 9, 250, 33, 12]


def _runtime_logits(path):
    import torch
    gm = load_artifact(path).gm
    with torch.inference_mode(), reference_mode():
        return gm(torch.tensor([IDS]), torch.arange(len(IDS))[None])[0].numpy()


def test_emit_both_writes_one_verified_folder(tiny_hf, tmp_path):
    out = tmp_path / "both"
    r = mcomp("optimize", tiny_hf, "--weights", "rtn:4:g32", "--emit", "safetensors,onnx",
              "--onnx-accuracy-level", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    m = verify_artifact(out)
    assert {"model.onnx", "model.onnx.data", "genai_config.json"} <= set(m["files"])
    assert m["emitted"]["onnx"]["accuracy_level"] == 0
    got = OrtDecoder(out).logits(IDS, prefill=4)           # prefill 4, then 6 decode steps
    assert np.abs(got - _runtime_logits(out)).max() <= 1e-4
    # the ONNX files are covered by the manifest's checksums like the weights
    data = out / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ArtifactError, match="model.onnx.data"):
        verify_artifact(out)


def test_emit_onnx_alone_writes_an_export_not_an_artifact(tiny_hf, tmp_path):
    out = tmp_path / "only"
    r = mcomp("optimize", tiny_hf, "--weights", "rtn:4:g32", "--emit", "onnx",
              "--onnx-accuracy-level", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    assert not (out / "model.safetensors").exists() and not (out / "manifest.json").exists()
    assert json.loads((out / "mcomp_export.json").read_text())["formats"] == ["onnx"]
    assert "export:" in r.stdout and "mcomp eval" not in r.stdout
    # oracle: the runtime on the same recipe written as an artifact (RTN is deterministic)
    art = tmp_path / "art"
    r = mcomp("optimize", tiny_hf, "--weights", "rtn:4:g32", "--out", art)
    assert r.returncode == 0, r.stderr
    assert np.abs(OrtDecoder(out).logits(IDS, prefill=4) - _runtime_logits(art)).max() <= 1e-4


def test_export_command_and_reexport(artifact, tmp_path):
    out = tmp_path / "onnx"
    r = mcomp("export", artifact, "--format", "onnx", "--out", out, "--accuracy-level", "0",
              "--max-length", "256")
    assert r.returncode == 0, r.stderr
    assert "onnx export:" in r.stdout
    marker = json.loads((out / "mcomp_export.json").read_text())
    assert marker["formats"] == ["onnx"] and marker["options"]["onnx"]["max_length"] == 256
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(marker["files"])
    got = OrtDecoder(out).logits(IDS)
    assert np.abs(got - _runtime_logits(artifact)).max() <= 1e-4
    r = mcomp("export", artifact, "--out", out)                 # an earlier export: replaced
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "genai_config.json").read_text())["model"]["context_length"] == 2048


def test_export_bad_input(artifact, tiny_hf, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    one_line_error(mcomp("export", artifact, "--out", foreign), 3, "not an mcomp export")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / "model.safetensors").write_bytes(b"\0" * 8)
    one_line_error(mcomp("export", bad, "--out", tmp_path / "o1"), 3, "model.safetensors")
    one_line_error(mcomp("export", tmp_path / "missing", "--out", tmp_path / "o2"), 3, "no such file")
    one_line_error(mcomp("export", artifact, "--format", "tflite", "--out", tmp_path / "o3"), 2,
                   "unknown emitter 'tflite'", "onnx")
    kivi = tmp_path / "kivi"
    r = mcomp("optimize", tiny_hf, "--weights", "rtn:4:g32", "--kv", "kivi4", "--out", kivi)
    assert r.returncode == 0, r.stderr
    one_line_error(mcomp("export", kivi, "--out", tmp_path / "o4"), 2, "stores its KV cache as 'kivi",
                   "exportable: dense fp32")
    one_line_error(mcomp("optimize", tiny_hf, "--kv", "kivi4", "--emit", "safetensors,onnx",
                         "--out", tmp_path / "o5"), 2, "kivi")
    for o in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / o).exists()                    # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
