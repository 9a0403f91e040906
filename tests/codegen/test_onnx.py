"""ONNX export: onnxruntime (CPU) logits of the exported graph against mcomp's runtime on the
same model, prefill and 16 decode steps through past/present KV; the weight layouts against
MatMulNBits' documented semantics; refusals. Tiny random models built in code.

Oracle: mcomp's runtime with its reference kernels (w = (q − z)·s, dequantized) and its own
KV cache. MatMulNBits at accuracy_level 0 computes the same fp32 products in another
summation order, so quantized models are held to the fp32 tolerance too; accuracy_level 4
(int8 activations, onnxruntime's fast path) gets a bound from the activation rounding.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from mcomp.codegen.onnx import ExportOptions, export_onnx, onnx_model  # noqa: E402
from mcomp.codegen.onnx.lowering import nbits_layout  # noqa: E402
from mcomp.codegen.onnx.run import OrtDecoder  # noqa: E402
from mcomp.compiler import ir  # noqa: E402
from mcomp.compiler.spec import KVSpec, LayerSpec, RopeSpec  # noqa: E402
from mcomp.errors import ExportError  # noqa: E402
from mcomp.quant import primitives as P  # noqa: E402
from mcomp.quant.hqq import HQQConfig, QuantizeWeightsHQQ  # noqa: E402
from mcomp.quant.linear import QuantLinear  # noqa: E402
from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig  # noqa: E402
from mcomp.quant.scheme import WeightScheme  # noqa: E402
from mcomp.runtime.kernels import reference_mode  # noqa: E402
from mcomp.runtime.kvcache import AttentionState  # noqa: E402
from tests.helpers import tiny_gm, tiny_spec  # noqa: E402

TOL = 1e-4
PREFILL, STEPS = 12, 16
WINDOW = 6          # < PREFILL + STEPS: sliding layers evict during the test
IDS = torch.randint(3, 128, (PREFILL + STEPS,), generator=torch.Generator().manual_seed(7))


def runtime_logits(gm, ids=IDS, prefill=PREFILL) -> np.ndarray:
    """(T, V): mcomp's runtime, prefill then one token per step through its KV cache."""
    spec = ir.get_spec(gm)
    st = AttentionState(spec, 1, model=gm)
    rows = []
    with torch.inference_mode(), reference_mode():
        pos = torch.arange(prefill)[None]
        st.begin(pos)
        rows.append(gm(ids[None, :prefill], pos, st)[0])
        for t in range(prefill, len(ids)):
            pos = torch.tensor([[t]])
            st.begin(pos)
            rows.append(gm(ids[None, t:t + 1], pos, st)[0])
    return torch.cat(rows).numpy()


def exported(gm, tmp_path, **opts) -> OrtDecoder:
    out = export_onnx(gm, tmp_path / "onnx", options=ExportOptions(**{"accuracy_level": 0, "max_length": 64, **opts}))
    onnx.checker.check_model(str(out / "model.onnx"))
    return OrtDecoder(out)


def gemma3_spec(**kw):
    local, glob = RopeSpec(theta=10_000.0, dim=16), RopeSpec(theta=1_000_000.0, dim=16)
    layers = tuple(LayerSpec(n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                             window=None if i % 3 == 2 else WINDOW, rope=glob if i % 3 == 2 else local,
                             qk_norm=True, sandwich_norm=True) for i in range(3))
    return tiny_spec(family="gemma3", layers=layers, act="gelu_tanh", norm_eps=1e-6,
                     embed_scale=64 ** 0.5, attn_scale=24 ** -0.5, **kw)


def qwen3_spec():
    ls = LayerSpec(n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, qk_norm=True,
                   rope=RopeSpec(theta=1_000_000.0, dim=16))
    return tiny_spec(family="qwen3", layers=(ls, ls), tie_embeddings=False)


def pruned_spec():
    """FLAP-like: heads, KV heads and FFN width differ per layer; o_proj carries a bias."""
    r = RopeSpec(theta=10_000.0, dim=16)
    layers = (LayerSpec(n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, rope=r, o_bias=True),
              LayerSpec(n_heads=3, n_kv_heads=1, head_dim=16, ffn_dim=40, rope=r, o_bias=True),
              LayerSpec(n_heads=2, n_kv_heads=2, head_dim=16, ffn_dim=64, rope=r, o_bias=True))
    return tiny_spec(layers=layers)


SPECS = {
    "llama": tiny_spec,
    "qwen3": qwen3_spec,
    "gemma3": gemma3_spec,
    "gemma3-softcap": lambda: gemma3_spec(final_logit_softcap=5.0),
    "pruned": pruned_spec,
    "qkv-bias-fused": lambda: tiny_spec(layers=(dataclasses.replace(
        tiny_spec().layers[0], qkv_bias=True, fused_qkv=True, fused_gate_up=True),) * 2),
}


@pytest.mark.parametrize("family", SPECS)
def test_fp32_parity_prefill_and_decode(family, tmp_path):
    gm = tiny_gm(SPECS[family]())
    ref = runtime_logits(gm)
    got = exported(gm, tmp_path).logits(IDS.tolist(), PREFILL)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL


def test_sliding_window_changes_the_logits(tmp_path):
    """The gemma3 parity above means something: without the window the logits differ."""
    spec = gemma3_spec()
    gm = tiny_gm(spec)
    full = tiny_gm(dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, window=None)
                                                           for l in spec.layers)))
    assert np.abs(runtime_logits(gm) - runtime_logits(full)).max() > 1e-2


def _rtn(gm, **kw):
    return QuantizeWeightsRTN(RTNConfig(**kw)).run(gm, None).gm


QUANT = {
    "int4-g32": dict(bits=4, group_size=32),
    "int4-sym-g16": dict(bits=4, group_size=16, symmetric=True),
    "int8-per-channel": dict(bits=8, group_size=0),          # K=96 → blocks of 32, scales repeated
    "int3-g32": dict(bits=3, group_size=32),                 # re-packed as 4-bit codes
    "int3-sym-g32": dict(bits=3, group_size=32, symmetric=True),
    "int2-g16": dict(bits=2, group_size=16),
    "int4-g48-bf16": dict(bits=4, group_size=48, scale_dtype="bfloat16"),   # blocks of 16
    "int4-emb4": dict(bits=4, group_size=32, embedding_bits=4),   # GatherBlockQuantized, tied head
    "int4-emb8": dict(bits=4, group_size=32, embedding_bits=8, embedding_group_size=0),
    "int4-emb2": dict(bits=4, group_size=32, embedding_bits=2),   # gathered from the fp32 table
}


@pytest.mark.parametrize("name", QUANT)
def test_quantized_parity(name, tmp_path):
    gm = _rtn(tiny_gm(), **QUANT[name])
    ref = runtime_logits(gm)
    got = exported(gm, tmp_path).logits(IDS.tolist(), PREFILL)
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "pruned"])
def test_quantized_parity_other_families(family, tmp_path):
    gm = _rtn(tiny_gm(SPECS[family]()), bits=4, group_size=16, embedding_bits=8)
    got = exported(gm, tmp_path).logits(IDS.tolist(), PREFILL)
    assert np.abs(got - runtime_logits(gm)).max() <= TOL


def test_hqq_fractional_zeros_and_mixed_precision(tmp_path):
    """HQQ's float zero points go in as float zero points; one linear at 8 bits, one float."""
    gm = QuantizeWeightsHQQ(HQQConfig(bits=4, group_size=32, iters=3)).run(tiny_gm(), None).gm
    zeros = gm.get_submodule("layers.0.q_proj").zeros.float()
    assert not torch.equal(zeros, zeros.round())          # the case under test
    lin = gm.get_submodule("layers.1.down_proj")
    w = lin.dequantize()
    s8 = WeightScheme(bits=8, group_size=32)
    sc, z = P.rtn_params(w, s8, integer_zero=True)
    ir.replace_module(gm, "layers.1.down_proj",
                      QuantLinear.from_codes(P.quantize_codes(w, sc, z, 8, 32), sc, z, s8))
    ir.replace_module(gm, "layers.0.o_proj", torch.nn.Linear(64, 64, bias=False))
    got = exported(gm, tmp_path).logits(IDS.tolist(), PREFILL)
    assert np.abs(got - runtime_logits(gm)).max() <= TOL


def test_accuracy_level_4_stays_within_activation_rounding(tmp_path):
    """int8 activations (the fast path): KL vs the exact export stays small, top-1 agrees."""
    gm = _rtn(tiny_gm(), bits=4, group_size=32)
    exact = exported(gm, tmp_path / "a").logits(IDS.tolist(), PREFILL)
    fast = exported(gm, tmp_path / "b", accuracy_level=4).logits(IDS.tolist(), PREFILL)
    assert not np.array_equal(exact, fast)                    # it is a different kernel
    lp = torch.log_softmax(torch.from_numpy(exact), -1)
    lq = torch.log_softmax(torch.from_numpy(fast), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)

    assert kl.mean() < 2e-3 and kl.max() < 2e-2
    assert (exact.argmax(-1) == fast.argmax(-1)).mean() >= 0.9


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (3, 32, True), (8, 0, False),
                                            (2, 48, False)])
def test_nbits_layout_dequantizes_to_the_modules_weight(bits, group, sym):
    """MatMulNBits' documented semantics, evaluated in numpy on the emitted layout: codes from
    the packed blobs (low bits first), zero points from their packed bytes (or floats), blocks
    of `block` columns → exactly QuantLinear.dequantize()."""
    K, N = 200, 24                                     # partial last group / block
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(bits))
    s = WeightScheme(bits=bits, group_size=group, symmetric=sym)
    sc, z = P.rtn_params(w, s, integer_zero=True)
    mod = QuantLinear.from_codes(P.quantize_codes(w, sc, z, bits, s.effective_group(K)), sc, z, s)
    lay = nbits_layout(mod, "x")
    nb, blk, b = lay.n_blocks, lay.block, lay.bits
    assert (blk & (blk - 1)) == 0 and blk >= 16 and nb == -(-K // blk)
    per = 8 // b
    raw = lay.B.numpy().reshape(N, -1)
    q = ((raw[..., None] >> (np.arange(per) * b)) & (2 ** b - 1)).reshape(N, -1)   # (N, nb·blk)
    if lay.zeros is None:
        zp = np.full((N, nb), 2 ** (b - 1), np.float32)
    elif lay.zeros.dtype == torch.uint8:
        zr = lay.zeros.numpy()
        zp = ((zr[..., None] >> (np.arange(per) * b)) & (2 ** b - 1)).reshape(N, -1)[:, :nb]
    else:
        zp = lay.zeros.numpy()
    deq = ((q.reshape(N, nb, blk) - zp[..., None]) * lay.scales.numpy()[..., None]).reshape(N, -1)[:, :K]
    assert np.array_equal(deq, mod.dequantize().numpy())


# ----------------------------------------------------------------------------- refusals

def test_unexportable_kv_is_refused_by_name(tmp_path):
    from mcomp.runtime.kv import KV_KINDS
    gm = tiny_gm()
    kivi = KV_KINDS.get("kivi")
    ir.set_layer_kv(gm, 1, KVSpec(kind="kivi", params=kivi.Params()))
    with pytest.raises(ExportError, match=r"layer 1 stores its KV cache as 'kivi.*exportable: dense fp32"):
        export_onnx(gm, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    gm = tiny_gm()
    ir.set_layer_kv(gm, 0, KVSpec(kind="dense", params=KV_KINDS.get("dense").Params(dtype="float16")))
    with pytest.raises(ExportError, match="dense-float16"):
        onnx_model(gm)


def test_8bit_fractional_zeros_are_refused():
    w = torch.randn(8, 64)
    s = WeightScheme(bits=8, group_size=32)
    sc, z = P.rtn_params(w, s, integer_zero=False)
    mod = QuantLinear.from_codes(P.quantize_codes(w, sc, z, 8, 32), sc, z, s)
    with pytest.raises(ExportError, match="8-bit weights with fractional zero points"):
        nbits_layout(mod, "layers.0.q_proj")


def test_group_without_a_power_of_two_block_is_refused():
    s = WeightScheme(bits=4, group_size=24)
    w = torch.randn(8, 48)
    sc, z = P.rtn_params(w, s)
    mod = QuantLinear.from_codes(P.quantize_codes(w, sc, z, 4, 24), sc, z, s)
    with pytest.raises(ExportError, match="group size 24"):
        nbits_layout(mod, "x")


def test_max_length_beyond_positions_is_refused():
    with pytest.raises(ExportError, match="beyond the model's 2048 positions"):
        onnx_model(tiny_gm(), ExportOptions(max_length=4096))


def test_genai_config_describes_the_graph(tmp_path):
    out = export_onnx(tiny_gm(gemma3_spec()), tmp_path / "o", options=ExportOptions(max_length=64))
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["filename"] == "model.onnx" and dec["num_hidden_layers"] == 3
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert dec["num_key_value_heads"] == 2 and dec["head_size"] == 16
    assert cfg["model"]["context_length"] == 64 and cfg["search"]["max_length"] == 64
    assert cfg["model"]["eos_token_id"] == [2] and cfg["model"]["bos_token_id"] == 1


def test_block_choice_avoids_padding_where_it_saves_bytes():
    from mcomp.codegen.onnx.lowering import choose_block
    assert choose_block(128, 576, 4) == 64      # 9 blocks, no padding (128 would pad to 640)
    assert choose_block(128, 1536, 4) == 128    # divides K: the largest block stores least
    assert choose_block(576, 576, 8) == 64      # per-channel: any block, least bytes
    assert choose_block(24, 48, 4) is None
