"""assign_kv: per-layer KV representation, the --kv shorthand, the int4-kivi4 preset, and the
KVSpecs surviving an artifact round trip."""
from __future__ import annotations

import pytest
import torch

from mcomp.api import resolve_recipe
from mcomp.codegen import load_artifact, save_artifact
from mcomp.compiler import ir
from mcomp.compiler.manager import PassManager
from mcomp.compiler.recipe import Recipe, parse_kv_flag
from mcomp.errors import ConfigError
from mcomp.compiler.spec import KVSpec
from mcomp.passes.assign_kv import AssignKV, AssignKVConfig, apply_kv_flag
from mcomp.runtime.kv import parse_kv
from mcomp.runtime.kvcache import AttentionState
from mcomp.runtime.kv.kivi import KIVICache
from tests.helpers import tiny_ctx, tiny_gm, tiny_spec


def P(gm, i=1):
    """Layer i's KIVI params."""
    return ir.get_spec(gm).layers[i].kv.params


def test_assign_kv_sets_layers_and_is_verified_through_caches():
    gm = tiny_gm(tiny_spec(n_layers=3))
    cfg = AssignKVConfig(kv="kivi2:g8:r16", skip_layers=(0,))
    gm, rep = PassManager([AssignKV(cfg)]).run(gm, tiny_ctx())
    kinds = [l.kv.kind for l in ir.get_spec(gm).layers]
    assert kinds == ["dense", "kivi", "kivi"]
    kv = P(gm)
    assert (kv.k_bits, kv.v_bits, kv.group_size, kv.residual) == (2, 2, 8, 16)
    rec = rep.passes[0]
    assert rec.stats["layers"] == [1, 2]
    assert rec.stats["kv_bytes_per_token_after"] < rec.stats["kv_bytes_per_token_before"]
    # the probe without a cache cannot see the pass; the cache-aware check does
    assert rec.drift["kld"] == pytest.approx(0.0, abs=1e-9)
    kd = rec.kv_drift
    assert kd["decode_steps"] >= 16 + 2 * 8 and kd["kld"] > 0 and kd["bytes_ok"]
    # node metadata follows the spec
    attn = [n.meta["mcomp"].get("kv") for n in ir.nodes_by_role(gm, "attn")]
    assert attn == ["dense", "kivi", "kivi"]
    assert [type(c).__name__ for c in AttentionState(ir.get_spec(gm), 1).caches] == \
        ["DenseKVCache", "KIVICache", "KIVICache"]


def test_layers_selection_and_errors():
    gm = tiny_gm(tiny_spec(n_layers=3))
    AssignKV(AssignKVConfig(kv="kivi8", layers=(-1,))).run(gm, None)
    assert [l.kv.kind for l in ir.get_spec(gm).layers] == ["dense", "dense", "kivi"]
    with pytest.raises(ConfigError, match="out of range"):
        AssignKV(AssignKVConfig(layers=(5,))).run(gm, None)
    with pytest.raises(ConfigError, match="kivi2, kivi4 or kivi8"):
        AssignKVConfig(kv="kivi3")
    with pytest.raises(ConfigError, match="must divide head_dim"):   # head_dim 16, group 12
        apply_kv_flag(tiny_gm(), "kivi4:g12")


def test_kv_shorthand():
    c = parse_kv("kivi2").spec.params
    assert (c.k_bits, c.group_size, c.residual, c.k_axis) == (2, 32, 128, "channel")
    assert parse_kv("kivi4").spec.params.k_bits == 4
    c = parse_kv("kivi2:g64:r32:s4:kt").spec.params
    assert (c.group_size, c.residual, c.sink, c.k_axis) == (64, 32, 4, "token")
    assert parse_kv("dense").spec == KVSpec()
    assert parse_kv("dense:bf16").spec.params.dtype == "bfloat16"
    for bad in ("kivi3", "kivi", "int4", "kivi2:x9", "", "dense:hk", "kivi2::g8"):
        with pytest.raises(ConfigError, match="--kv"):
            parse_kv(bad)
    with pytest.raises(ConfigError, match=r"registered: .*dense\[.*kivi2"):    # lists the kinds
        parse_kv("lowrank:0.5")
    [p] = parse_kv_flag("kivi2")
    assert p.name == "assign_kv" and p.stage == "kv"


def test_v1_assign_kv_config_migrates():
    old = AssignKVConfig.from_dict({"bits": 2, "group_size": 8, "residual": 16, "sink": 4,
                                    "k_rotation": "hadamard", "skip_layers": [0]})
    assert old.kv == "kivi2:g8:r16:s4:hk" and old.skip_layers == (0,)
    assert AssignKVConfig.from_dict({"kind": "dense"}).kv == "dense"
    mixed = AssignKVConfig.from_dict({"k_bits": 4, "v_bits": 2})
    assert mixed.kv == "kivi4:v2:g32:r128"
    p = mixed.choice().spec.params
    assert (p.k_bits, p.v_bits) == (4, 2)
    with pytest.raises(ConfigError, match="dtype 'bfloat16' has no shorthand"):
        AssignKVConfig.from_dict({"bits": 2, "dtype": "bfloat16"})   # not silently fp32


def test_kv_shorthand_rotations():
    assert parse_kv("kivi2:hk").spec.params.k_rotation == "hadamard"
    assert parse_kv("kivi2").spec.params.k_rotation == "none"
    assert parse_kv("kivi2:hk").spec.label() == "kivi-k2v2-g32-r128-hk"
    rot, kv = parse_kv_flag("kivi2:hv:hk:s4")
    assert (rot.name, rot.stage, rot.exact) == ("rotate_v", "transform", True)
    assert kv.config.kv == "kivi2:hk:s4"
    assert parse_kv("kivi2:hv").rewrites == ("rotate_v",)
    with pytest.raises(ConfigError, match="rotate_v"):   # a weight rewrite is not a KV spec
        AssignKVConfig(kv="kivi2:hv")


def test_kv_flag_with_rotation_in_a_recipe():
    r = resolve_recipe("int4-kivi4", kv="kivi2:hv")
    names = [p.name for p in r.passes]
    # the rotation runs on float weights: before fusion and weight quantization
    assert names == ["rotate_v", "fuse_qkv", "fuse_gate_up", "quantize_weights_rtn", "assign_kv"]
    assert r.passes[-1].config.kv == "kivi2"
    # applying another --kv keeps one rotate_v
    from mcomp.passes.assign_kv import with_kv_passes
    r2 = with_kv_passes(r, parse_kv_flag("kivi4:hv:hk"))
    assert [p.name for p in r2.passes].count("rotate_v") == 1
    assert r2.passes[-1].config.kv == "kivi4:hk"


def test_rotations_in_toml_recipe(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[[pass]]\nname = "assign_kv"\nkv = "kivi2:hk"\n\n'
                 '[[pass]]\nname = "rotate_v"\n')
    r = Recipe.from_file(f)
    assert [p.name for p in r.passes] == ["rotate_v", "assign_kv"]
    gm, rep = PassManager(list(r.passes)).run(tiny_gm(tiny_spec(n_layers=2)), tiny_ctx())
    assert rep.passes[0].drift["max_abs_logit"] < 1e-4
    assert all(l.kv.params.k_rotation == "hadamard" for l in ir.get_spec(gm).layers)
    with pytest.raises(ConfigError, match="unknown option 'hx'"):
        AssignKVConfig(kv="kivi2:hx")


def test_recipes_with_kv():
    r = Recipe.preset("int4-kivi4")
    assert [p.name for p in r.passes][-1] == "assign_kv"
    assert r.passes[-1].config.choice().spec.params.k_bits == 4
    assert r.passes[-1].config.choice().spec.params.sink == 4   # sinks: see the preset's comment
    r2 = resolve_recipe("int4-kivi4", kv="kivi2")
    kv_passes = [p for p in r2.passes if p.stage == "kv"]
    assert len(kv_passes) == 1 and kv_passes[0].config.kv == "kivi2"
    assert "quantize_weights_rtn" in [p.name for p in r2.passes]
    d = r2.to_dict()["passes"][-1]
    assert d["pass"] == "assign_kv" and d["config"]["kv"] == "kivi2"


def test_kv_specs_survive_artifact_round_trip(tmp_path):
    gm = tiny_gm(tiny_spec(n_layers=2))
    p = AssignKV(AssignKVConfig(kv="kivi2:g4:r4:s1", skip_layers=(0,)))
    gm, report = PassManager([p]).run(gm, tiny_ctx())
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny", report=report,
                         pass_log=[p])
    art = load_artifact(path)
    assert ir.get_spec(art.gm).layers == ir.get_spec(gm).layers
    # KV facts are stored once: in the per-layer model spec
    assert "kv" not in art.manifest
    kvs = [l["kv"] for l in art.manifest["model"]["layers"]]
    assert [x["kind"] for x in kvs] == ["dense", "kivi"]
    assert kvs[1]["params"]["k_bits"] == 2 and kvs[1]["params"]["sink"] == 1
    assert kvs[1]["params"]["k_rotation"] == "none" and kvs[1]["params"]["version"] == 1
    assert art.manifest["pass_log"][0]["config"]["kv"] == "kivi2:g4:r4:s1"
    state = AttentionState(ir.get_spec(art.gm), 1)
    assert isinstance(state.caches[1], KIVICache) and state.caches[1].n_sink == 1
    ids = torch.randint(3, 128, (1, 12))
    with torch.inference_mode():
        state.begin(torch.arange(12)[None])
        art.gm(ids, torch.arange(12)[None], state)
    assert state.caches[1].n_q == 4 and state.nbytes() > 0


def test_apply_kv_flag_runs_the_rotation_and_the_kv_pass():
    from mcomp.errors import PassError
    from mcomp.quant.rtn import QuantizeWeightsRTN
    gm = tiny_gm(tiny_spec(n_layers=2))
    ids, pos = torch.randint(3, 128, (1, 16)), torch.arange(16)[None]
    with torch.inference_mode():
        before = gm(ids, pos)
    stats = apply_kv_flag(gm, "kivi2:hv:hk")             # what `mcomp eval --kv` does
    assert stats[0]["rotated_layers"] == 2 and stats[1]["kv"] == "kivi-k2v2-g32-r128-hk"
    with torch.inference_mode():
        torch.testing.assert_close(gm(ids, pos), before, rtol=0, atol=1e-5 * before.abs().max().item())
    qgm, _ = PassManager([QuantizeWeightsRTN.from_dict({"group_size": 16})]).run(tiny_gm(), tiny_ctx())
    with pytest.raises(PassError, match="before weight quantization"):
        apply_kv_flag(qgm, "kivi2:hv")
    apply_kv_flag(qgm, "kivi2:hk")                        # an online rotation needs no float weights


def _as_format_2(m: dict) -> None:
    """Rewrite a format-3 manifest in place as mcomp wrote format 2 (flat KV records, spec
    version 1, the redundant top-level `kv` view), as 0d9ab93 wrote them."""
    for i, layer in enumerate(m["model"]["layers"]):
        kv = layer["kv"]
        params = {k: v for k, v in kv["params"].items() if k != "version"}
        layer["kv"] = {"kind": kv["kind"], **params}
    m["model"]["version"] = 1
    m["kv"] = [{"layer": i, **l["kv"]} for i, l in enumerate(m["model"]["layers"])]
    m["format_version"] = 2


def test_format_2_manifest_migrates(tmp_path):
    import json
    from mcomp.codegen.manifest import DIGEST_KEY, manifest_digest
    gm = tiny_gm(tiny_spec(n_layers=2))
    apply_kv_flag(gm, "kivi2:g4:r4:s1:hk")
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny")
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    _as_format_2(m)
    assert m["kv"][0] == {"layer": 0, "kind": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 4,
                          "residual": 4, "sink": 1, "k_axis": "channel",
                          "k_rotation": "hadamard", "dtype": "float32"}
    m[DIGEST_KEY] = manifest_digest(m)
    mpath.write_text(json.dumps(m))
    art = load_artifact(path)
    assert ir.get_spec(art.gm).layers == ir.get_spec(gm).layers
    assert art.manifest["migrated_from"] == 2 and "kv" not in art.manifest
    # the digest still covers the file as written: tampering is caught before migration
    m["model"]["layers"][1]["kv"]["k_bits"] = 4
    mpath.write_text(json.dumps(m))
    with pytest.raises(Exception, match="modified after it was written"):
        load_artifact(path)
