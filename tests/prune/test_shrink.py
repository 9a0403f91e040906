"""prune.shrink: pure slicing of a canonical state dict + spec, checked against masked references."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mcomp.compiler import ir
from mcomp.compiler.model import CausalLM
from mcomp.errors import ConfigError
from mcomp.prune import shrink
from tests.helpers import tiny_gm, tiny_spec

IDS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
POS = torch.arange(20).expand(2, -1)


def sd_of(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def logits(spec, sd):
    with torch.no_grad():
        return ir.build(spec, sd)(IDS, POS)


@pytest.mark.parametrize("kw", [
    {}, {"gated_mlp": False, "act": "gelu"}, {"norm": "layer"},
])
@pytest.mark.parametrize("layer_kw", [{}, {"qkv_bias": True, "o_bias": True, "mlp_bias": True,
                                           "down_bias": True, "qk_norm": True, "sandwich_norm": True}])
def test_param_counts_match_a_built_model(kw, layer_kw):
    spec = tiny_spec(n_layers=2, **kw)
    spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, **layer_kw) for l in spec.layers))
    spec = spec.with_layer(1, n_heads=2, n_kv_heads=1, ffn_dim=40)
    with torch.device("meta"):
        m = CausalLM(spec)
    total = sum(p.numel() for p in m.parameters())  # tied head counted once
    assert shrink.non_embedding_params(spec) == total - shrink.embedding_params(spec)


def test_keep_heads_matches_masking_the_removed_heads_gqa():
    """Removing query heads inside groups and whole KV groups equals zeroing their o_proj
    columns in the unpruned model: the GQA head→KV-head mapping survives the slicing."""
    spec = tiny_spec(n_layers=2, heads=6, kv_heads=3, head_dim=8)   # groups of 2 query heads
    gm = tiny_gm(spec)
    sd, D = sd_of(gm), 8
    # layer 0: drop KV group 1 (q heads 2, 3); layer 1: keep q head 1 of every group
    new_sd, new_spec = shrink.keep_heads(sd, spec, 0, [0, 2])
    new_sd, new_spec = shrink.keep_heads(new_sd, new_spec, 1, [0, 1, 2], [1])
    ref_sd = dict(sd)
    o0, o1 = sd["layers.0.o_proj.weight"].clone(), sd["layers.1.o_proj.weight"].clone()
    for h in (2, 3):
        o0[:, h * D:(h + 1) * D] = 0
    for h in (0, 2, 4):
        o1[:, h * D:(h + 1) * D] = 0
    ref_sd["layers.0.o_proj.weight"], ref_sd["layers.1.o_proj.weight"] = o0, o1
    assert (new_spec.layers[0].n_heads, new_spec.layers[0].n_kv_heads) == (4, 2)
    assert (new_spec.layers[1].n_heads, new_spec.layers[1].n_kv_heads) == (3, 3)
    torch.testing.assert_close(logits(new_spec, new_sd), logits(spec, ref_sd), rtol=0, atol=1e-5)


def test_keep_heads_per_group_lists_and_errors():
    spec = tiny_spec(n_layers=1, heads=4, kv_heads=2)
    sd = sd_of(tiny_gm(spec))
    _, s = shrink.keep_heads(sd, spec, 0, [0, 1], [[0], [1]])
    assert (s.layers[0].n_heads, s.layers[0].n_kv_heads) == (2, 2)
    with pytest.raises(ConfigError, match="same, non-zero"):
        shrink.keep_heads(sd, spec, 0, [0, 1], [[0], [0, 1]])
    with pytest.raises(ConfigError, match="every KV group"):
        shrink.keep_heads(sd, spec, 0, [])
    with pytest.raises(ConfigError, match="out of range"):
        shrink.keep_heads(sd, spec, 0, [2])
    fused = spec.with_layer(0, fused_qkv=True)
    with pytest.raises(ConfigError, match="unfused"):
        shrink.keep_heads(sd, fused, 0, [0])


@pytest.mark.parametrize("gated", [True, False])
def test_keep_channels_of_zero_contribution_is_exact(gated):
    spec = tiny_spec(n_layers=2, gated_mlp=gated, act="silu" if gated else "gelu")
    sd = sd_of(tiny_gm(spec))
    dead = torch.arange(0, 96, 3)
    sd["layers.1.down_proj.weight"][:, dead] = 0
    keep = [c for c in range(96) if c not in set(dead.tolist())]
    new_sd, new_spec = shrink.keep_channels(sd, spec, 1, keep)
    assert new_spec.layers[1].ffn_dim == 64 and new_spec.layers[0].ffn_dim == 96
    torch.testing.assert_close(logits(new_spec, new_sd), logits(spec, sd), rtol=0, atol=1e-5)


def test_drop_layers_of_an_identity_block_is_exact_and_renumbers():
    spec = tiny_spec(n_layers=3)
    sd = sd_of(tiny_gm(spec))
    sd["layers.1.o_proj.weight"].zero_()
    sd["layers.1.down_proj.weight"].zero_()
    new_sd, new_spec = shrink.drop_layers(sd, spec, [1])
    assert new_spec.n_layers == 2 and not any(k.startswith("layers.2.") for k in new_sd)
    torch.testing.assert_close(new_sd["layers.1.q_proj.weight"], sd["layers.2.q_proj.weight"])
    torch.testing.assert_close(logits(new_spec, new_sd), logits(spec, sd), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="at least one"):
        shrink.drop_layers(sd, spec, [0, 1, 2])


def test_bias_compensation_reproduces_a_constant_channel_exactly():
    """An MLP channel whose activation is a constant c (gate/up rows zero, constant biases):
    removing it and adding W_down[:, ch] * c as down_proj bias changes nothing."""
    spec = tiny_spec(n_layers=2)
    spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, mlp_bias=True) for l in spec.layers))
    sd = sd_of(tiny_gm(spec))
    ch = [5, 17]
    for n in ("gate_proj", "up_proj"):
        sd[f"layers.0.{n}.weight"][ch] = 0
    sd["layers.0.gate_proj.bias"][ch] = torch.tensor([1.5, -0.7])
    sd["layers.0.up_proj.bias"][ch] = torch.tensor([2.0, 3.0])
    const = torch.nn.functional.silu(torch.tensor([1.5, -0.7])) * torch.tensor([2.0, 3.0])
    mean = torch.zeros(96, dtype=torch.float64)
    mean[ch] = const.double()
    ref = logits(spec, sd)
    new_sd, new_spec = shrink.compensate_bias(sd, spec, 0, "down_proj", ch, mean)
    new_sd, new_spec = shrink.keep_channels(new_sd, new_spec, 0, [c for c in range(96) if c not in ch])
    assert new_spec.layers[0].down_bias and not new_spec.layers[1].down_bias
    torch.testing.assert_close(logits(new_spec, new_sd), ref, rtol=0, atol=1e-5)
    # without compensation the output does change: the test has teeth
    plain_sd, plain_spec = shrink.keep_channels(sd, spec, 0, [c for c in range(96) if c not in ch])
    assert (logits(plain_spec, plain_sd) - ref).abs().max() > 1e-3
