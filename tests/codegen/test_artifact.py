"""Artifact writer/reader: bit-exact round trips, and every integrity check on a damaged,
tampered or foreign artifact. Tiny models built in code; no checkpoint is read."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch

from mcomp.codegen import artifact as A
from mcomp.codegen import emit as E
from mcomp.codegen import load_artifact, save_artifact, verify_artifact
from mcomp.codegen.manifest import DIGEST_KEY, FORMAT, implied_tensors, manifest_digest
from mcomp.compiler import ir
from mcomp.compiler.context import CompileContext
from mcomp.compiler.manager import PassManager
from mcomp.compiler.spec import KVSpec, LayerSpec, ModelSpec, RopeSpec
from mcomp.errors import ArtifactError
from mcomp.passes.fuse_qkv import FuseQKV
from mcomp.quant.linear import QuantLinear
from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig

VOCAB, HIDDEN = 96, 64


def _layer(heads=4, kv_heads=2, head_dim=16, ffn=96, **kw) -> LayerSpec:
    return LayerSpec(n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, ffn_dim=ffn,
                     rope=RopeSpec(theta=10000.0, dim=head_dim), **kw)


def _spec(layers=None, **kw) -> ModelSpec:
    base = dict(family="llama", vocab_size=VOCAB, hidden_size=HIDDEN,
                layers=tuple(layers or (_layer(), _layer())), bos_token_id=1, eos_token_ids=(2,))
    base.update(kw)
    return ModelSpec(**base)


def _gm(spec: ModelSpec, seed: int = 0):
    gm = ir.build(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return gm


def _ctx(seed: int = 0) -> CompileContext:
    g = torch.Generator().manual_seed(seed)
    return CompileContext(calib_ids=torch.randint(3, VOCAB, (2048,), generator=g),
                          probe_ids=torch.randint(3, VOCAB, (2, 16), generator=g), bos_id=1)


def _rtn(**kw):
    return QuantizeWeightsRTN(RTNConfig(bits=4, group_size=32, **kw))


_COMPILED: dict = {}


def _compile(spec, passes, seed=0):
    """PassManager run (verification on), cached per configuration: tests only read the result."""
    key = (spec, tuple(repr(p.describe()) for p in passes), seed)
    if key not in _COMPILED:
        _COMPILED[key] = PassManager(passes).run(_gm(spec, seed), _ctx(seed), "tiny")
    return _COMPILED[key]


BATCH = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
POS = torch.arange(12).expand(2, -1)


@pytest.fixture
def tok_dir(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (d / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (d / "special_tokens_map.json").write_text("{}")
    (d / "config.json").write_text("{}")                        # not a tokenizer file
    (d / "model.safetensors").write_bytes(b"not ours")          # must not be copied
    return d


@pytest.fixture
def saved(tmp_path, tok_dir):
    """An RTN int4 g32 artifact of the default tiny model: (gm, report, path)."""
    gm, report = _compile(_spec(), [_rtn()])
    path = save_artifact(gm, tmp_path / "art", tokenizer_dir=tok_dir, source="tiny", report=report)
    return gm, report, path


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert ir.get_spec(a) == ir.get_spec(b)
    with torch.no_grad():
        assert torch.equal(a(BATCH, POS), b(BATCH, POS))


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def _rewrite_manifest(path, edit, *, rehash=True):
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    if rehash:
        m[DIGEST_KEY] = manifest_digest(m)
    mpath.write_text(json.dumps(m, indent=2))


# ----------------------------------------------------------------------------- round trips

def test_round_trip_rtn_tied_head(saved, tok_dir):
    gm, report, path = saved
    assert ir.get_spec(gm).tie_embeddings  # RTN skips lm_head by default: the tie survives
    art = load_artifact(path)
    _assert_same_model(gm, art.gm)
    assert not art.gm.training
    assert art.path == path and art.tokenizer_dir == path
    assert isinstance(art.gm.get_submodule("layers.0.q_proj"), QuantLinear)
    assert art.gm.get_submodule("lm_head").weight is art.gm.get_submodule("embed").weight
    assert art.gm.get_submodule("layers.1.down_proj").mcomp_role == "down_proj"
    assert art.gm.get_submodule("layers.1.down_proj").mcomp_layer == 1

    m = art.manifest
    assert m["format"] == FORMAT and m["format_version"] == 3 and m["source"] == "tiny"
    assert ModelSpec.from_dict(m["model"]) == ir.get_spec(gm)
    assert "kv" not in m        # KV facts live once, in the per-layer model spec
    assert [l["kv"] for l in m["model"]["layers"]] == [
        {"kind": "dense", "params": {"dtype": "float32", "version": 1}}] * 2
    assert m["weights"]["layers.0.q_proj"]["kind"] == "quantized"
    assert m["weights"]["layers.0.q_proj"]["scheme"]["group_size"] == 32
    assert m["weights"]["lm_head"] == {"kind": "float", "shape": [VOCAB, HIDDEN], "scheme": None,
                                       "bytes": 0, "tied_to": "embed"}
    assert "lm_head.weight" not in m["tensors"] and "embed.weight" in m["tensors"]
    assert m["tensors"]["layers.0.q_proj.qweight"] == {"dtype": "uint8", "shape": [64, 32]}
    assert [p["pass"] for p in m["pass_log"]] == ["quantize_weights_rtn"]
    assert m["pass_log"][0]["stats"]["quantized"] == 14
    assert m["report"]["passes"][0]["name"] == "quantize_weights_rtn"
    assert m["tokenizer"]["files"] == ["tokenizer.json", "tokenizer_config.json",
                                       "special_tokens_map.json"]
    assert set(m["files"]) == {"model.safetensors", *m["tokenizer"]["files"]}
    assert not (path / "config.json").exists()
    assert (path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    # the weight table's bytes add up to what the file holds
    assert sum(w["bytes"] for w in m["weights"].values()) + sum(
        torch.tensor(t["shape"]).prod().item() * 4 for k, t in m["tensors"].items()
        if k.endswith("norm.weight") or k == "embed.weight") == ir.weight_bytes(gm)
    assert verify_artifact(path) == m
    # no pickle anywhere: the weights file is safetensors with our metadata
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "mcomp-artifact", "format_version": "3"}


@pytest.mark.parametrize("case", ["rtn_head", "float_untied", "float_tied"])
def test_round_trip_head_variants(tmp_path, case):
    if case == "rtn_head":
        gm, report = _compile(_spec(), [_rtn(skip_roles=())])
        assert not ir.get_spec(gm).tie_embeddings
        assert isinstance(gm.get_submodule("lm_head"), QuantLinear)
    else:
        gm, report = _gm(_spec(tie_embeddings=case == "float_tied")), None
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source=case, report=report)
    art = load_artifact(path)
    _assert_same_model(gm, art.gm)
    assert art.tokenizer_dir is None and art.manifest["tokenizer"]["files"] == []
    assert ("lm_head.weight" in art.manifest["tensors"]) == (case == "float_untied")
    if case == "rtn_head":
        assert art.manifest["weights"]["lm_head"]["kind"] == "quantized"


def test_round_trip_fuse_qkv(tmp_path):
    gm, report = _compile(_spec(), [FuseQKV()])
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny", report=report,
                         pass_log=[FuseQKV()])
    art = load_artifact(path)
    _assert_same_model(gm, art.gm)
    assert all(l.fused_qkv for l in ir.get_spec(art.gm).layers)
    assert "layers.0.qkv_proj" in art.manifest["weights"]
    assert "layers.0.q_proj" not in art.manifest["weights"]
    assert art.manifest["pass_log"] == [{"pass": "fuse_qkv", "version": 1, "config": {}}]


def test_round_trip_heterogeneous(tmp_path):
    layers = (_layer(heads=4, kv_heads=2, ffn=96, qkv_bias=True),
              _layer(heads=2, kv_heads=1, ffn=40, qk_norm=True, window=6, o_bias=True,
                     kv=KVSpec("dense")),
              _layer(heads=6, kv_heads=3, head_dim=8, ffn=64, mlp_bias=True, down_bias=True))
    gm, report = _compile(_spec(layers), [FuseQKV(), _rtn(skip_layers=(2,))])
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="hetero", report=report)
    art = load_artifact(path)
    _assert_same_model(gm, art.gm)
    w = art.manifest["weights"]
    assert w["layers.1.down_proj"]["shape"] == [HIDDEN, 40]
    assert w["layers.2.down_proj"]["kind"] == "float"
    assert "layers.0.qkv_proj.bias" in art.manifest["tensors"]
    assert [p["pass"] for p in art.manifest["pass_log"]] == ["fuse_qkv", "quantize_weights_rtn"]


def test_recipe_is_stored_and_log_comes_from_report(tmp_path):
    """The recipe is stored as given; without an explicit pass_log, the log comes from the report."""
    gm, report = _compile(_spec(), [_rtn()])
    recipe = {"name": "int4", "passes": [{"pass": "quantize_weights_rtn"}]}
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="x", report=report,
                         recipe=recipe)
    m = verify_artifact(path)
    assert m["recipe"] == recipe and m["pass_log"][0]["pass"] == "quantize_weights_rtn"


def test_implied_tensors_is_what_the_model_holds():
    gm, _ = _compile(_spec(), [_rtn()])
    m = json.loads(json.dumps(A.describe_linears(gm, ir.get_spec(gm))))
    implied = implied_tensors(ir.get_spec(gm), m)
    sd = gm.state_dict()
    assert set(implied) == set(sd) - {"lm_head.weight"}
    for k, t in implied.items():
        assert list(sd[k].shape) == list(t.shape) and str(sd[k].dtype) == "torch." + t.dtype


# ----------------------------------------------------------------------------- integrity

def test_truncated_weights(saved):
    _, _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as e:
        load_artifact(path)
    msg = _one_line_error(e)
    assert f"model.safetensors is truncated: {len(data) // 2} of {len(data)} bytes" in msg


def test_flipped_byte_in_weights(saved):
    _, _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) - 100] ^= 0x01   # inside the tensor data, same size
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as e:
        verify_artifact(path)
    msg = _one_line_error(e)
    assert "model.safetensors" in msg and "sha256 mismatch" in msg


def test_edited_manifest_is_detected(saved):
    _, _, path = saved
    _rewrite_manifest(path, lambda m: m["model"]["layers"][0].update(ffn_dim=128), rehash=False)
    with pytest.raises(ArtifactError) as e:
        load_artifact(path)
    msg = _one_line_error(e)
    assert "manifest.json" in msg and "modified" in msg


def test_edited_manifest_with_recomputed_digest_fails_shape_check(saved):
    """Someone who also fixes the digest still cannot make the spec disagree with the tensors."""
    _, _, path = saved
    _rewrite_manifest(path, lambda m: m["model"]["layers"][0].update(ffn_dim=128))
    with pytest.raises(ArtifactError) as e:
        load_artifact(path)
    msg = _one_line_error(e)
    assert "manifest.json" in msg and "layers.0." in msg and "128" in msg


@pytest.mark.parametrize("rehash", [True, False])
def test_unsupported_format_version(saved, rehash):
    _, _, path = saved
    _rewrite_manifest(path, lambda m: m.update(format_version=4), rehash=rehash)
    with pytest.raises(ArtifactError) as e:
        load_artifact(path)
    msg = _one_line_error(e)
    assert "format version 4" in msg and "version 1, 2, 3" in msg and "manifest.json" in msg
    assert "upgrade mcomp" in msg


def test_header_disagreeing_with_manifest(saved):
    """A weights file swapped for another one (and its checksum updated) is still caught."""
    _, _, path = saved
    from safetensors.torch import load_file, save_file
    f = path / "model.safetensors"
    sd = load_file(str(f))
    sd["layers.0.q_proj.scales"] = sd["layers.0.q_proj.scales"].float()
    save_file(sd, str(f), metadata={"format": FORMAT, "format_version": "1"})
    data = f.read_bytes()
    _rewrite_manifest(path, lambda m: m["files"]["model.safetensors"].update(
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
    with pytest.raises(ArtifactError) as e:
        load_artifact(path)
    msg = _one_line_error(e)
    assert "model.safetensors" in msg and "layers.0.q_proj.scales" in msg and "float32" in msg


def test_corrupt_header_length(saved):
    _, _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    f.write_bytes(bytes(data))
    _rewrite_manifest(path, lambda m: m["files"]["model.safetensors"].update(
        sha256=hashlib.sha256(bytes(data)).hexdigest()))
    with pytest.raises(ArtifactError, match="corrupt safetensors header") as e:
        load_artifact(path)
    _one_line_error(e)


def test_foreign_directory_and_file(tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    for i in range(3):
        (d / f"f{i}.bin").write_bytes(os.urandom(64))
    with pytest.raises(ArtifactError, match="not an mcomp artifact") as e:
        load_artifact(d)
    _one_line_error(e)
    (d / "manifest.json").write_bytes(os.urandom(64))
    with pytest.raises(ArtifactError, match="not an mcomp artifact"):
        load_artifact(d)
    (d / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="not an mcomp artifact"):
        verify_artifact(d)
    with pytest.raises(ArtifactError, match="not an mcomp artifact") as e:
        load_artifact(d / "f0.bin")
    _one_line_error(e)
    with pytest.raises(ArtifactError, match="no such file"):
        load_artifact(tmp_path / "nope")


def test_missing_tokenizer_file(saved):
    _, _, path = saved
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(ArtifactError) as e:
        load_artifact(path)
    msg = _one_line_error(e)
    assert "tokenizer_config.json" in msg and "missing" in msg


def test_save_refuses_model_that_disagrees_with_its_spec(tmp_path):
    gm = _gm(_spec())
    ir.set_spec(gm, ir.get_spec(gm).with_layer(1, ffn_dim=80))
    out = tmp_path / "a"
    with pytest.raises(ArtifactError, match="layers.1") as e:
        save_artifact(gm, out, tokenizer_dir=None, source="x")
    _one_line_error(e)
    assert not out.exists() and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- atomicity

def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _boom(*a, **k):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("where", ["save_file", "_write_manifest"])
def test_failed_save_leaves_previous_artifact(saved, tok_dir, monkeypatch, where):
    _, _, path = saved
    before = _snapshot(path)
    gm2, report2 = _compile(_spec(), [FuseQKV()], seed=1)
    monkeypatch.setattr(A, where, _boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_artifact(gm2, path, tokenizer_dir=tok_dir, source="second", report=report2)
    assert _snapshot(path) == before
    assert sorted(os.listdir(path.parent)) == ["art", "hf"]   # no temp dirs left behind
    verify_artifact(path)


def test_failed_swap_restores_previous_artifact(saved, monkeypatch):
    _, _, path = saved
    before = _snapshot(path)
    real, calls = os.rename, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:        # 1: old artifact renamed away, 2: new one renamed in
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(E, "_rename", flaky)
    gm2, _ = _compile(_spec(), [FuseQKV()], seed=1)
    with pytest.raises(ArtifactError, match="cannot write artifact") as e:
        save_artifact(gm2, path, tokenizer_dir=None, source="second")
    _one_line_error(e)
    assert _snapshot(path) == before
    assert sorted(os.listdir(path.parent)) == ["art", "hf"]


def test_overwrite_replaces_existing_artifact(saved):
    gm, _, path = saved
    gm2, _ = _compile(_spec(), [FuseQKV()], seed=1)
    save_artifact(gm2, path, tokenizer_dir=None, source="second")
    art = load_artifact(path)
    _assert_same_model(gm2, art.gm)
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors"]
    assert sorted(os.listdir(path.parent)) == ["art", "hf"]
    with pytest.raises(ArtifactError, match="overwrite=True"):
        save_artifact(gm, path, tokenizer_dir=None, source="third", overwrite=False)


def test_resave_loaded_artifact_onto_itself(saved):
    """The tokenizer source may be the artifact being replaced: files are copied before the swap."""
    gm, _, path = saved
    art = load_artifact(path)
    save_artifact(art.gm, path, tokenizer_dir=art.tokenizer_dir, source="again")
    again = load_artifact(path)
    _assert_same_model(gm, again.gm)
    assert again.manifest["tokenizer"]["files"] == art.manifest["tokenizer"]["files"]
    assert sorted(os.listdir(path.parent)) == ["art", "hf"]


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    gm = _gm(_spec())
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not an mcomp artifact") as e:
        save_artifact(gm, home, tokenizer_dir=None, source="x")
    _one_line_error(e)
    assert os.listdir(home) == ["thesis.tex"] and sorted(os.listdir(tmp_path)) == ["home"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        save_artifact(gm, a_file, tokenizer_dir=None, source="x")
    empty = tmp_path / "empty"
    empty.mkdir()
    save_artifact(gm, empty, tokenizer_dir=None, source="x")   # an empty directory is fine
    verify_artifact(empty)
