"""rotate_v: Hadamard rotation of V folded into v_proj / o_proj weights.

Tolerance: the rotated fp32 model's logits equal the unrotated ones within 1e-5 × max|logit|
(absolute, rtol 0). The folding is done in float64 and stored in fp32, so the only differences
are fp32 rounding of the rotated weights and of the reassociated sums (observed ~1e-6
relative); the PassManager's own exact-pass check (1e-4 × logit scale) also passes. A wrong
rotation (not orthonormal) moves logits by orders of magnitude more and fails verification.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mcomp.compiler import ir
from mcomp.compiler.hadamard import hadamard, hadamard_block
from mcomp.compiler.manager import PassManager
from mcomp.compiler.passes import PASSES
from mcomp.compiler.spec import LayerSpec, ModelSpec, RopeSpec
from mcomp.errors import ConfigError, PassError
from mcomp.passes.fuse_qkv import FuseQKV
from mcomp.passes.rotate_v import RotateV, RotateVConfig
from tests.helpers import tiny_ctx, tiny_gm, tiny_spec

REL_TOL = 1e-5


def gqa_spec() -> ModelSpec:
    """llama, GQA 4/2 in layer 0 and 6/2 in layer 1 (heterogeneous, as after pruning)."""
    return tiny_spec().with_layer(1, n_heads=6)


def qwen2_spec() -> ModelSpec:
    spec = dataclasses.replace(tiny_spec(), family="qwen2")
    return dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, qkv_bias=True, o_bias=True)
                                                  for l in spec.layers))


def gemma3_spec() -> ModelSpec:
    """gemma3-like: head_dim 256, 2 heads / 1 KV head, q/k norms, sandwich norms, a sliding
    layer and a global layer with another RoPE base, logit softcap."""
    def layer(window, theta):
        return LayerSpec(n_heads=2, n_kv_heads=1, head_dim=256, ffn_dim=96, window=window,
                         rope=RopeSpec(theta=theta, dim=256), qk_norm=True, sandwich_norm=True)
    return ModelSpec(family="gemma3", vocab_size=128, hidden_size=64,
                     layers=(layer(8, 10000.0), layer(None, 1e6)), act="gelu_tanh",
                     embed_scale=8.0, attn_scale=256 ** -0.5, final_logit_softcap=30.0,
                     norm_eps=1e-6, bos_token_id=1, eos_token_ids=(2,))


def logits(gm, T=24):
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return gm(ids, torch.arange(T).expand(2, -1))


def assert_same_function(before, after):
    scale = before.abs().max().item()
    torch.testing.assert_close(after, before, rtol=0, atol=REL_TOL * scale)


@pytest.mark.parametrize("n", [1, 2, 16, 64, 256, 24, 80, 96])
def test_rotation_is_orthonormal(n):
    R = hadamard(n, torch.float64)
    torch.testing.assert_close(R @ R.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    b = hadamard_block(n)
    # every channel of a block mixes every other channel of it with weight ±1/√b
    blk = R[:b, :b].abs()
    torch.testing.assert_close(blk, torch.full((b, b), b ** -0.5, dtype=torch.float64))


def test_non_power_of_two_without_a_usable_block_is_rejected():
    with pytest.raises(ConfigError, match="head_dim=12 is not a power of two"):
        hadamard(12)


@pytest.mark.parametrize("spec_fn,fuse", [(gqa_spec, False), (gqa_spec, True),
                                          (qwen2_spec, False), (qwen2_spec, True),
                                          (gemma3_spec, False)],
                         ids=["llama-gqa", "llama-fused-qkv", "qwen2-bias", "qwen2-bias-fused",
                              "gemma3-hd256"])
def test_rotated_model_computes_the_same_function(spec_fn, fuse):
    gm = tiny_gm(spec_fn())
    before = logits(gm)
    w_before = {k: v.clone() for k, v in gm.state_dict().items()}
    passes = ([FuseQKV()] if fuse else []) + [RotateV()]
    gm, report = PassManager(passes).run(gm, tiny_ctx())
    rec = report.passes[-1]
    assert rec.exact and rec.stats["rotated_layers"] == 2
    assert rec.drift["top1"] == 1.0
    assert_same_function(before, logits(gm))
    # the weights did move (V and o_proj), the graph and spec did not
    moved = [k for k, v in gm.state_dict().items() if k in w_before and not torch.equal(v, w_before[k])]
    assert moved and all(("v_proj" in k or "qkv_proj" in k or "o_proj.weight" in k) for k in moved)
    # the artifact path rebuilds from spec + weights alone
    assert_same_function(before, logits(ir.build(ir.get_spec(gm), gm.state_dict())))


def test_v_is_rotated_per_kv_head():
    spec = gqa_spec()
    gm = tiny_gm(spec)
    x = torch.randn(5, spec.hidden_size)
    v0 = gm.get_submodule("layers.0.v_proj")(x).detach().view(5, 2, 16)
    gm = RotateV().run(gm, None).gm
    v1 = gm.get_submodule("layers.0.v_proj")(x).detach().view(5, 2, 16)
    torch.testing.assert_close(v1, v0 @ hadamard(16), rtol=0, atol=1e-5)


def test_wrong_rotation_is_caught_by_verification():
    class Skewed(RotateV):          # not orthonormal: a 5% scale on top of the Hadamard matrix
        def rotation(self, head_dim):
            return 1.05 * super().rotation(head_dim)

    with pytest.raises(PassError, match="declared exact but changed the logits"):
        PassManager([Skewed()]).run(tiny_gm(gqa_spec()), tiny_ctx())


def test_needs_float_linears():
    from mcomp.quant.rtn import QuantizeWeightsRTN
    quant = QuantizeWeightsRTN.from_dict({"bits": 4, "group_size": 16})
    gm, _ = PassManager([quant]).run(tiny_gm(), tiny_ctx())
    with pytest.raises(PassError, match="before weight quantization"):
        PassManager([RotateV()]).run(gm, tiny_ctx())


def test_config_and_registration():
    assert PASSES.get("rotate_v") is RotateV and RotateV.stage == "transform"
    assert RotateV.from_dict({}).describe() == {"pass": "rotate_v", "version": 1,
                                                "config": {"rotation": "hadamard", "version": 1}}
    with pytest.raises(ConfigError, match="rotation 'random' not in hadamard"):
        RotateVConfig(rotation="random")
