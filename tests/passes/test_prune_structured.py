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
    gm2, rep = run(gm, method="flap", ratio=0.3, structure="global")
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


def test_structure_search_keeps_the_structure_with_the_lower_calibration_loss():
    from mcomp.prune.structured import calibration_loss
    spec = tiny_spec(n_layers=3, heads=6, kv_heads=3, head_dim=8)
    gm = tiny_gm(spec)
    with torch.no_grad():
        gm.get_submodule("layers.2.o_proj").weight.mul_(0.05)
    ctx = small_ctx()
    gm2, rep = PassManager([PruneStructured(PruneStructuredConfig(method="flap", ratio=0.3))]
                           ).run(gm, ctx)
    st = rep.passes[0].stats
    losses = st["structure_search"]                       # flap's default structure is search
    assert set(losses) == {"global", "uniform"} and st["structure"] == min(losses, key=losses.get)
    assert calibration_loss(gm2, ctx) == pytest.approx(losses[st["structure"]], abs=1e-5)
    for other in losses:                                  # each loss is that structure's model's
        g, _ = PassManager([PruneStructured(PruneStructuredConfig(
            method="flap", ratio=0.3, structure=other))]).run(gm, ctx)
        assert calibration_loss(g, ctx) == pytest.approx(losses[other], abs=1e-5)


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
    flat = "".join(r.output.split())          # help wraps lines (textwrap also breaks at hyphens)
    assert "--prune" in flat and "wanda-sp:0.3" in flat and "flap:400MB" in flat


def test_byte_target_lands_on_the_requested_weight_bytes():
    gm = tiny_gm(tiny_spec(n_layers=2))
    before = ir.weight_bytes(gm)
    fixed = before - 4 * shrink.non_embedding_params(ir.get_spec(gm))
    want = fixed + (before - fixed) * 3 // 4                 # a quarter of the decoder goes
    new, rep = run(gm, method="wanda-sp", target_bytes=want, min_head_fraction=0.25)
    got = ir.weight_bytes(new)
    assert rep.passes[0].stats["weight_bytes_after"] == got
    # the planner lands on the closest achievable count: within one unit (a KV group) of bytes
    ls = ir.get_spec(gm).layers[0]
    group = 4 * shrink.block_params(ls, ir.get_spec(gm))["attn"] // ls.n_kv_heads
    assert abs(got - want) <= group and got < before
    with pytest.raises(ConfigError, match="not reachable.*embedding"):
        run(gm, method="wanda-sp", target_bytes=fixed)
    with pytest.raises(ConfigError, match="not both"):
        PruneStructuredConfig(target_params=10, target_bytes=10)
    p = parse_prune_flag("flap:400MB")
    assert p.config.target_bytes == 400_000_000
    with pytest.raises(ConfigError, match="unit"):
        parse_prune_flag("flap:400XB")


def test_flap_postnorm_reads_the_post_projection_norm_when_there_is_one():
    """Gemma-style sandwich norm y = g ⊙ Wx / rms(Wx): a channel writing only to a dimension the
    norm's gain zeroes does not reach the residual stream; plain FLAP cannot see that."""
    from torch import nn

    from mcomp.prune.importance import Flap, FlapPostNorm, LayerStats
    torch.manual_seed(0)
    x = torch.randn(500, 4)                       # o_proj input: 4 channels, equal variance
    o = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        o.weight.copy_(torch.tensor([[3.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]))
    norm = nn.Module()
    norm.weight = nn.Parameter(torch.tensor([0.0, 1.0]))   # dimension 0 never reaches the residual
    st = LayerStats()
    for xs in x.split(100):
        st.o_proj.add(xs)
        out = o(xs)
        st.o_proj_normed.add(xs / out.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    st.down_proj, st.down_proj_normed = st.o_proj, st.o_proj_normed   # MLP side unused here
    mods = {"o_proj": o, "down_proj": o}
    plain, _ = Flap().channel_scores({**mods, "post_attn_norm": norm}, st)
    aware, _ = FlapPostNorm().channel_scores({**mods, "post_attn_norm": norm}, st)
    torch.testing.assert_close(FlapPostNorm().channel_scores(mods, st)[0], plain)  # no norm: same
    assert int(plain.argmax()) == 0               # by raw fluctuation, channel 0 matters most
    assert aware[0].item() == 0.0 and aware[1].item() > 0   # it is invisible after the norm
