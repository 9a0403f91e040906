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
from mcomp.passes.assign_kv import AssignKV, AssignKVConfig, apply_kv, kv_shorthand
from mcomp.runtime.kvcache import AttentionState
from mcomp.runtime.kv.kivi import KIVICache
from tests.helpers import tiny_ctx, tiny_gm, tiny_spec


def test_assign_kv_sets_layers_and_reports_zero_probe_drift():
    gm = tiny_gm(tiny_spec(n_layers=3))
    cfg = AssignKVConfig(bits=2, group_size=8, residual=16, skip_layers=(0,))
    gm, rep = PassManager([AssignKV(cfg)]).run(gm, tiny_ctx())
    kinds = [l.kv.kind for l in ir.get_spec(gm).layers]
    assert kinds == ["dense", "kivi", "kivi"]
    kv = ir.get_spec(gm).layers[1].kv
    assert (kv.k_bits, kv.v_bits, kv.group_size, kv.residual) == (2, 2, 8, 16)
    rec = rep.passes[0]
    assert rec.stats["layers"] == [1, 2]
    assert rec.stats["kv_bytes_per_token_after"] < rec.stats["kv_bytes_per_token_before"]
    assert "state=None" in rec.stats["note"]
    assert rec.drift["kld"] == pytest.approx(0.0, abs=1e-9)   # the probe runs without a cache
    # node metadata follows the spec
    attn = [n.meta["mcomp"].get("kv") for n in ir.nodes_by_role(gm, "attn")]
    assert attn == ["dense", "kivi", "kivi"]
    assert [type(c).__name__ for c in AttentionState(ir.get_spec(gm), 1).caches] == \
        ["DenseKVCache", "KIVICache", "KIVICache"]


def test_layers_selection_and_errors():
    gm = tiny_gm(tiny_spec(n_layers=3))
    apply_kv(gm, AssignKVConfig(bits=8, layers=(-1,)))
    assert [l.kv.kind for l in ir.get_spec(gm).layers] == ["dense", "dense", "kivi"]
    with pytest.raises(ConfigError, match="out of range"):
        apply_kv(gm, AssignKVConfig(layers=(5,)))
    with pytest.raises(ConfigError, match="bits"):
        AssignKVConfig(bits=3)
    with pytest.raises(ConfigError, match="must divide head_dim"):   # head_dim 16, group 12
        apply_kv(tiny_gm(), AssignKVConfig(group_size=12))


def test_kv_shorthand():
    c = kv_shorthand("kivi2")
    assert (c.bits, c.group_size, c.residual, c.k_axis) == (2, 32, 128, "channel")
    assert kv_shorthand("kivi4").kv_spec().k_bits == 4
    c = kv_shorthand("kivi2:g64:r32:s4:kt")
    assert (c.group_size, c.residual, c.sink, c.k_axis) == (64, 32, 4, "token")
    assert kv_shorthand("dense").kv_spec().kind == "dense"
    for bad in ("kivi3", "kivi", "int4", "kivi2:x9", "", "dense:hk"):
        with pytest.raises(ConfigError, match="--kv"):
            kv_shorthand(bad)
    [p] = parse_kv_flag("kivi2")
    assert p.name == "assign_kv" and p.stage == "kv"


def test_kv_shorthand_rotations():
    assert kv_shorthand("kivi2:hk").kv_spec().k_rotation == "hadamard"
    assert kv_shorthand("kivi2").kv_spec().k_rotation == "none"
    assert kv_shorthand("kivi2:hk").kv_spec().label() == "kivi-k2v2-g32-r128-hk"
    rot, kv = parse_kv_flag("kivi2:hv:hk:s4")
    assert (rot.name, rot.stage, rot.exact) == ("rotate_v", "transform", True)
    assert kv.config.k_rotation == "hadamard" and kv.config.sink == 4
    with pytest.raises(ConfigError, match="rotate_v"):   # a weight rewrite is not a KV spec
        kv_shorthand("kivi2:hv")


def test_kv_flag_with_rotation_in_a_recipe():
    r = resolve_recipe("int4-kivi4", kv="kivi2:hv")
    names = [p.name for p in r.passes]
    # the rotation runs on float weights: before fusion and weight quantization
    assert names == ["rotate_v", "fuse_qkv", "fuse_gate_up", "quantize_weights_rtn", "assign_kv"]
    assert r.passes[-1].config.bits == 2
    # applying another --kv keeps one rotate_v
    from mcomp.passes.assign_kv import with_kv_passes
    r2 = with_kv_passes(r, parse_kv_flag("kivi4:hv:hk"))
    assert [p.name for p in r2.passes].count("rotate_v") == 1
    assert r2.passes[-1].config.k_rotation == "hadamard"


def test_rotations_in_toml_recipe(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[[pass]]\nname = "assign_kv"\nbits = 2\nk_rotation = "hadamard"\n\n'
                 '[[pass]]\nname = "rotate_v"\n')
    r = Recipe.from_file(f)
    assert [p.name for p in r.passes] == ["rotate_v", "assign_kv"]
    gm, rep = PassManager(list(r.passes)).run(tiny_gm(tiny_spec(n_layers=2)), tiny_ctx())
    assert rep.passes[0].drift["max_abs_logit"] < 1e-4
    assert all(l.kv.k_rotation == "hadamard" for l in ir.get_spec(gm).layers)
    with pytest.raises(ConfigError, match="k_rotation"):
        AssignKVConfig(k_rotation="random")


def test_recipes_with_kv():
    r = Recipe.preset("int4-kivi4")
    assert [p.name for p in r.passes][-1] == "assign_kv"
    assert r.passes[-1].config.kv_spec().k_bits == 4
    assert r.passes[-1].config.kv_spec().sink == 4       # sinks: see the preset's comment
    r2 = resolve_recipe("int4-kivi4", kv="kivi2")
    kv_passes = [p for p in r2.passes if p.stage == "kv"]
    assert len(kv_passes) == 1 and kv_passes[0].config.bits == 2
    assert "quantize_weights_rtn" in [p.name for p in r2.passes]
    d = r2.to_dict()["passes"][-1]
    assert d["pass"] == "assign_kv" and d["config"]["bits"] == 2


def test_kv_specs_survive_artifact_round_trip(tmp_path):
    gm = tiny_gm(tiny_spec(n_layers=2))
    p = AssignKV(AssignKVConfig(bits=2, group_size=4, residual=4, sink=1, skip_layers=(0,)))
    gm, report = PassManager([p]).run(gm, tiny_ctx())
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny", report=report,
                         pass_log=[p])
    art = load_artifact(path)
    assert ir.get_spec(art.gm).layers == ir.get_spec(gm).layers
    assert [x["kind"] for x in art.manifest["kv"]] == ["dense", "kivi"]
    assert art.manifest["kv"][1]["k_bits"] == 2 and art.manifest["kv"][1]["sink"] == 1
    # a dense layer serializes exactly as before quantized kinds and rotations existed
    assert ir.get_spec(art.gm).layers[0].kv.to_dict() == {"kind": "dense", "dtype": "float32"}
    assert art.manifest["kv"][1]["k_rotation"] == "none"
    state = AttentionState(ir.get_spec(art.gm), 1)
    assert isinstance(state.caches[1], KIVICache) and state.caches[1].n_sink == 1
    ids = torch.randint(3, 128, (1, 12))
    with torch.inference_mode():
        state.begin(torch.arange(12)[None])
        art.gm(ids, torch.arange(12)[None], state)
    assert state.caches[1].n_q == 4 and state.nbytes() > 0


def test_apply_kv_flag_runs_the_rotation_and_the_kv_pass():
    from mcomp.errors import PassError
    from mcomp.passes.assign_kv import apply_kv_flag
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
