"""prune_structured: exactness on zero-contribution structure, bias compensation, GQA,
heterogeneous artifacts through the runtime, targets and their errors, recipes and shorthands."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mcomp.compiler import ir
from mcomp.compiler.context import CalibrationConfig, CompileContext
from mcomp.compiler.manager import PassManager
from mcomp.compiler.recipe import Recipe, parse_prune_flag
from mcomp.errors import ConfigError, PassError
from mcomp.prune import shrink
from mcomp.prune.structured import PruneStructured, PruneStructuredConfig
from tests.helpers import tiny_gm, tiny_spec

IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))
POS = torch.arange(24).expand(2, -1)


def small_ctx(seed: int = 0) -> CompileContext:
    g = torch.Generator().manual_seed(seed)
    return CompileContext(calib_ids=torch.randint(3, 128, (2048,), generator=g),
                          probe_ids=torch.randint(3, 128, (2, 16), generator=g), bos_id=1,
                          config=CalibrationConfig(n_samples=8, seq_len=32))


def run(gm, **cfg):
    return PassManager([PruneStructured(PruneStructuredConfig(**cfg))]).run(gm, small_ctx())


def fwd(gm):
    with torch.no_grad():
        return gm(IDS, POS)


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_zero_contribution_heads_and_channels_are_removed_exactly(method):
    """KV group 1 (its o_proj columns zero) and half the MLP channels (down columns zero) of
    every layer contribute nothing; pruning exactly that share removes exactly them."""
    spec = tiny_spec(n_layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96)
    gm = tiny_gm(spec)
    with torch.no_grad():
        for i in range(2):
            gm.get_submodule(f"layers.{i}.o_proj").weight[:, 32:] = 0
            gm.get_submodule(f"layers.{i}.down_proj").weight[:, 1::2] = 0
    ref = fwd(gm)
    pruned = spec
    for i in range(2):
        pruned = pruned.with_layer(i, n_heads=2, n_kv_heads=1, ffn_dim=48)
    total = shrink.non_embedding_params(spec)
    ratio = 1 - shrink.non_embedding_params(pruned) / total
    # flap: zero columns have zero fluctuation; heads and channels compete on one threshold,
    # so give each module its own run to keep the test about exactness, not about ranking
    targets = [("heads", "channels")] if method == "wanda-sp" else [("heads",), ("channels",)]
    for t in targets:
        kept = pruned if len(t) == 2 else (
            spec.with_layer(0, n_heads=2, n_kv_heads=1).with_layer(1, n_heads=2, n_kv_heads=1)
            if t == ("heads",) else spec.with_layer(0, ffn_dim=48).with_layer(1, ffn_dim=48))
        r = 1 - shrink.non_embedding_params(kept) / total
        gm2, rep = run(gm, method=method, ratio=r, targets=t)
        out_spec = ir.get_spec(gm2)
        assert [(l.n_heads, l.n_kv_heads, l.ffn_dim) for l in out_spec.layers] == \
               [(l.n_heads, l.n_kv_heads, l.ffn_dim) for l in kept.layers]
        torch.testing.assert_close(fwd(gm2), ref, rtol=0, atol=1e-5)
        st = rep.passes[0].stats
        assert st["non_embedding_params_after"] < st["non_embedding_params_before"]
    assert ratio > 0


def test_flap_bias_compensation_reproduces_constant_channels():
    spec = tiny_spec(n_layers=1)
    spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, mlp_bias=True) for l in spec.layers))
    gm = tiny_gm(spec)
    ch = [3, 40, 77]
    with torch.no_grad():
        for n in ("gate_proj", "up_proj"):
            gm.get_submodule(f"layers.0.{n}").weight[ch] = 0
        gm.get_submodule("layers.0.gate_proj").bias[ch] = torch.tensor([1.0, 2.0, -0.5])
        gm.get_submodule("layers.0.up_proj").bias[ch] = torch.tensor([1.5, -1.0, 4.0])
    ref = fwd(gm)
    r = 3 * spec.hidden_size * 3 / shrink.non_embedding_params(spec) * 1.0001
    gm2, rep = run(gm, method="flap", ratio=r, targets=("channels",))
    ls = ir.get_spec(gm2).layers[0]
    assert ls.ffn_dim == 93 and ls.down_bias
    torch.testing.assert_close(fwd(gm2), ref, rtol=0, atol=1e-5)
    gm3, _ = run(gm, method="flap", ratio=r, targets=("channels",), bias_compensation=False)
    assert (fwd(gm3) - ref).abs().max() > 1e-3


def test_flap_global_structure_is_heterogeneous_and_runs_from_an_artifact(tmp_path):
    from mcomp.codegen import load_artifact, save_artifact
    from mcomp.runtime.kvcache import AttentionState
    from mcomp.runtime.session import Session
    spec = tiny_spec(n_layers=3, heads=6, kv_heads=3, head_dim=8)
    gm = tiny_gm(spec)
    with torch.no_grad():  # make layer 2's attention and layer 0's MLP matter little
        gm.get_submodule("layers.2.o_proj").weight.mul_(0.05)
        gm.get_submodule("layers.0.down_proj").weight[:, :60].mul_(0.01)
    gm2, rep = run(gm, method="flap", ratio=0.3)
    st = rep.passes[0].stats
    assert abs(st["removed_ratio"] - 0.3) < 0.05
    layers = ir.get_spec(gm2).layers
    assert len({(l.n_heads, l.n_kv_heads, l.ffn_dim) for l in layers}) > 1   # adaptive
    assert all(l.n_heads % l.n_kv_heads == 0 for l in layers)
    assert [e["layer"] for e in st["layers"]] == [0, 1, 2]
    assert all("params_before" in e and "params_after" in e for e in st["layers"])
    path = save_artifact(gm2, tmp_path / "art", tokenizer_dir=None, source="tiny", report=rep)
    art = load_artifact(path)
    ref = fwd(gm2)
    torch.testing.assert_close(fwd(art.gm), ref, rtol=0, atol=1e-5)
    # incremental decoding through the per-layer caches (heterogeneous heads) = full forward
    state = AttentionState(ir.get_spec(art.gm), batch=2)
    outs = []
    with torch.no_grad():
        for a, b in ((0, 10), (10, 11), (11, 24)):
            state.begin(POS[:, a:b])
            outs.append(art.gm(IDS[:, a:b], POS[:, a:b], state))
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-4)
    new = Session(art.gm).generate_ids([[1, 5, 9, 33]], max_new_tokens=5, stop_at_eos=False)
    assert len(new[0]) == 5


def test_q_head_unit_on_a_single_kv_head_model():
    spec = tiny_spec(n_layers=2, heads=4, kv_heads=1, head_dim=16)
    gm = tiny_gm(spec)
    gm2, rep = run(gm, method="wanda-sp", ratio=0.25)
    layers = ir.get_spec(gm2).layers
    assert all(l.n_kv_heads == 1 for l in layers)
    assert any(l.n_heads < 4 for l in layers)
    assert rep.passes[0].stats["layers"][0]["head_unit"] == "q_head"


def test_magnitude_needs_no_calibration_and_excluded_layers_stay():
    spec = tiny_spec(n_layers=3)
    gm = tiny_gm(spec)
    gm2, rep = run(gm, method="magnitude", ratio=0.2, exclude_layers=(1,))
    layers = ir.get_spec(gm2).layers
    assert layers[1] == spec.layers[1]
    assert rep.passes[0].stats["layers"][1]["reason"] == "excluded"
    assert layers[0].ffn_dim < 96


@pytest.mark.parametrize("kw, match", [
    ({"ratio": 0.0}, "strictly between 0 and 1"),
    ({"ratio": 1.0}, "strictly between 0 and 1"),
    ({"ratio": 1.5}, "strictly between 0 and 1"),
    ({"ratio": 0.6, "min_head_fraction": 0.5, "min_channel_fraction": 0.5}, "contradicts the keep-minimums"),
    ({"method": "nope"}, "choose one of"),
    ({"targets": ("rows",)}, "targets"),
    ({"min_heads_per_layer": 0}, "≥ 1"),
])
def test_impossible_configs_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        PruneStructuredConfig(**kw)


def test_unreachable_target_is_a_config_error_at_run_start():
    gm = tiny_gm(tiny_spec(n_layers=2))
    with pytest.raises(ConfigError, match="allow removing at most"):
        run(gm, method="magnitude", ratio=0.9, targets=("channels",))
    with pytest.raises(ConfigError, match="allow removing at most"):
        run(gm, method="magnitude", ratio=0.5, exclude_layers=(0, 1))


def test_pruning_after_fusion_is_refused():
    from mcomp.passes.fuse_qkv import FuseQKV
    gm = tiny_gm(tiny_spec(n_layers=1))
    with pytest.raises(PassError, match="before fuse"):
        PassManager([FuseQKV(), PruneStructured(PruneStructuredConfig(method="magnitude"))]
                    ).run(gm, small_ctx())


def test_prune_shorthand_parses_and_replaces_the_prune_stage():
    p = parse_prune_flag("flap:0.2")
    assert p.name == "prune_structured" and p.config.method == "flap" and p.config.ratio == 0.2
    assert parse_prune_flag("wanda-sp:0.3").config.method == "wanda-sp"
    assert parse_prune_flag("magnitude:0.2").config.ratio == 0.2
    lp = parse_prune_flag("layers:4")
    assert lp.name == "prune_layers" and lp.config.n_layers == 4
    r = Recipe.preset("flap20-int4")
    assert [x.name for x in r.passes] == ["prune_structured", "fuse_qkv", "fuse_gate_up",
                                          "quantize_weights_rtn"]
    r2 = r.replace_stage(parse_prune_flag("layers:2"))
    assert [x.name for x in r2.passes][0] == "prune_layers" and len(r2.passes) == 4
    from mcomp.api import resolve_recipe
    r3 = resolve_recipe("int4", weights="rtn:8", prune="magnitude:0.25")
    assert [x.name for x in r3.passes][0] == "prune_structured"
    assert r3.passes[-1].config.bits == 8


@pytest.mark.parametrize("bad", ["flap", "flap:", "flap:x", "flap:1.2", "foo:0.2", "layers:x",
                                 "layers:0", "flap:0.2:3"])
def test_bad_prune_shorthand_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        parse_prune_flag(bad)


def test_recipe_file_with_pruning(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "p"\n[[pass]]\nname = "fuse_qkv"\n[[pass]]\nname = "prune_structured"\n'
                 'method = "wanda-sp"\nratio = 0.25\nexclude_layers = [0]\n'
                 '[[pass]]\nname = "prune_layers"\nn_layers = 1\n')
    r = Recipe.from_file(p)
    assert [x.name for x in r.passes][2] == "fuse_qkv"
    assert r.passes[0].config.exclude_layers == (0,)
    p.write_text('[[pass]]\nname = "prune_structured"\nratio = 1.0\n')
    with pytest.raises(ConfigError, match="strictly between"):
        Recipe.from_file(p)


def test_cli_prune_option_reaches_the_recipe():
    from click.testing import CliRunner

    from mcomp.cli.main import cli
    r = CliRunner().invoke(cli, ["optimize", "x", "--prune", "flap:1.5"])
    assert r.exit_code == 2 and "strictly between 0 and 1" in r.output
    r = CliRunner().invoke(cli, ["optimize", "x", "--prune", "layers:0"])
    assert r.exit_code == 2 and "n_layers=0" in r.output
    r = CliRunner().invoke(cli, ["optimize", "--help"])
    assert "--prune" in r.output and "wanda-sp:0.3" in r.output
