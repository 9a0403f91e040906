"""The canonical decoder → one ONNX graph with onnxruntime-genai's decoder interface.

Interface (what onnxruntime-genai's DefaultKeyValueCache and its "decoder" config expect):
inputs `input_ids` (B, S) int64, `attention_mask` (B, past+S) int64 and per layer
`past_key_values.{i}.key|value` (B, Hkv_i, past, D) fp32; outputs `logits` (B, S, V) fp32 and
`present.{i}.key|value` (B, Hkv_i, past+S, D). Each layer's KV-head count is a concrete dim of
its own past/present shape, so a pruned model with different KV heads per layer is described
by the graph itself.

The graph is lowered from the ModelSpec, the source of truth for the canonical model's
structure (compiler/model.py builds the fx IR from the same spec; the parity tests compare the
two on every family): per block, norm → q/k/v → (q/k norms) → GroupQueryAttention (RoPE
applied inside from cos/sin caches, sliding window, scale) → o → (sandwich norm) → residual
fused into the next SkipSimplifiedLayerNormalization → MLP. The module of each weight picks its
lowering from the registries in lowering.py.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from torch import fx

from ...compiler import ir as mir
from ...compiler.model import rope_inv_freq, rope_table_index
from ...errors import ExportError
from ...quant.embedding import EMBED, HEAD
from .graph import GraphBuilder
from .lowering import (ACT_LOWERINGS, EMBED_LOWERINGS, F32, KV_LOWERINGS, check_exportable,
                       lower_linear, rms_norm, skip_rms_norm)
from .options import ExportOptions

I64, I32 = ir.DataType.INT64, ir.DataType.INT32


def check_model(spec) -> None:
    """Everything the lowering cannot express, as one-line errors, before anything is built."""
    if spec.norm != "rms":
        raise ExportError(f"family '{spec.family}': {spec.norm} norm is not lowered to ONNX yet "
                          "(exportable: RMSNorm families: llama, qwen2, qwen3, gemma3)")
    if spec.learned_positions:
        raise ExportError(f"family '{spec.family}': learned absolute positions are not lowered "
                          "to ONNX yet (exportable: RoPE families: llama, qwen2, qwen3, gemma3)")
    for i, ls in enumerate(spec.layers):
        if ls.rope is None:
            raise ExportError(f"layer {i} has no rotary embedding; the ONNX lowering needs RoPE")
        if ls.rope.dim != ls.head_dim:
            raise ExportError(f"layer {i}: partial rotary ({ls.rope.dim} of {ls.head_dim} "
                              "channels) is not lowered to ONNX")
        if not spec.gated_mlp:
            raise ExportError("a non-gated MLP is not lowered to ONNX yet")
    if spec.act not in ACT_LOWERINGS:
        raise ExportError(f"activation '{spec.act}' has no ONNX lowering "
                          f"(lowerable: {', '.join(sorted(ACT_LOWERINGS))})")
    check_exportable(spec)


def rotary_caches(rope, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_length, D/2) cos and sin: the same fp32 values the runtime's RotaryTable computes
    (positions · inv_freq in fp32, then cos/sin), so the rotation angles agree exactly."""
    pos = torch.arange(max_length)[:, None].float()
    freqs = pos * rope_inv_freq(rope)
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def build_model(gm: fx.GraphModule, opts: ExportOptions, *, source: str = "") -> ir.Model:
    spec = mir.get_spec(gm)
    check_model(spec)
    if opts.max_length > spec.max_positions:
        raise ExportError(f"max length {opts.max_length} is beyond the model's "
                          f"{spec.max_positions} positions")
    b = GraphBuilder()
    shared: dict = {}   # tied tensors: lowered once, read by the embedding and the head
    eps = spec.norm_eps
    ids = b.input("input_ids", I64, ["batch_size", "sequence_length"])
    mask = b.input("attention_mask", I64, ["batch_size", "total_sequence_length"])

    # GroupQueryAttention's sequence bookkeeping from the mask (as onnxruntime-genai feeds it):
    # seqlens_k = tokens held after this step − 1, total_sequence_length = mask width
    held = b.op("ReduceSum", [mask, b.const([1])], {"keepdims": 0}, name="/model/attn_mask/ReduceSum")
    seqlens = b.op("Cast", [b.op("Sub", [held, b.const(1)], name="/model/attn_mask/Sub")],
                   {"to": I32}, name="/model/attn_mask/seqlens_k")
    total = b.op("Cast", [b.op("Gather", [b.op("Shape", [mask], name="/model/attn_mask/Shape"),
                                          b.const(1)], {"axis": 0}, name="/model/attn_mask/Gather")],
                 {"to": I32}, name="/model/attn_mask/total_seq_len")

    ropes = {}
    for r, j in rope_table_index(spec).items():
        cos, sin = rotary_caches(r, opts.max_length)
        ropes[r] = (b.init(f"rotary.{j}.cos_cache", cos), b.init(f"rotary.{j}.sin_cache", sin))

    embed = gm.get_submodule(EMBED)
    head = gm.get_submodule(HEAD)
    x = EMBED_LOWERINGS.get(embed, EMBED)(b, embed, ids, EMBED, opts, shared,
                                          head if spec.tie_embeddings else None)
    if spec.embed_scale != 1.0:
        x = b.op("Mul", [x, b.const(np.float32(spec.embed_scale), np.float32)],
                 name="/model/embed/scale")

    delta = None         # the pending residual branch, added inside the next norm
    for i, ls in enumerate(spec.layers):
        blk = gm.get_submodule(f"layers.{i}")
        pre = f"layers.{i}"

        def norm(mod_name, x, delta):
            w = getattr(blk, mod_name).weight
            if delta is None:
                return rms_norm(b, x, w, eps, f"{pre}.{mod_name}"), x
            return skip_rms_norm(b, x, delta, w, eps, f"{pre}.{mod_name}")

        h, x = norm("attn_norm", x, delta)
        if ls.fused_qkv:
            qkv = lower_linear(b, blk.qkv_proj, h, f"{pre}.qkv_proj", opts, shared)
            q, k, v = b.ops("Split", [qkv, b.const([ls.q_dim, ls.kv_dim, ls.kv_dim])], {"axis": -1},
                            n=3, name=f"{pre}.qkv_proj/Split")
        else:
            q, k, v = (lower_linear(b, getattr(blk, p), h, f"{pre}.{p}", opts, shared)
                       for p in ("q_proj", "k_proj", "v_proj"))
        if ls.qk_norm:   # per-head RMSNorm on (B, S, H, D), before the rotation inside GQA
            def head_norm(t, mod_name):
                t4 = b.op("Reshape", [t, b.const([0, 0, -1, ls.head_dim])], name=f"{pre}.{mod_name}/Reshape")
                t4 = rms_norm(b, t4, getattr(blk, mod_name).weight, eps, f"{pre}.{mod_name}")
                return b.op("Reshape", [t4, b.const([0, 0, -1])], name=f"{pre}.{mod_name}/Flatten")
            q, k = head_norm(q, "q_norm"), head_norm(k, "k_norm")
        kv_shape = ["batch_size", ls.n_kv_heads, "past_sequence_length", ls.head_dim]
        past_k = b.input(f"past_key_values.{i}.key", F32, kv_shape)
        past_v = b.input(f"past_key_values.{i}.value", F32, kv_shape)
        attn, pk, pv = KV_LOWERINGS[ls.kv.kind](
            b, q=q, k=k, v=v, past_k=past_k, past_v=past_v, seqlens_k=seqlens, total_len=total,
            rope=ropes[ls.rope], ls=ls, scale=blk.attn.scale, name=f"{pre}.attn")
        present = ["batch_size", ls.n_kv_heads, "total_sequence_length", ls.head_dim]
        b.output(pk, f"present.{i}.key", F32, present)
        b.output(pv, f"present.{i}.value", F32, present)
        o = lower_linear(b, blk.o_proj, attn, f"{pre}.o_proj", opts, shared)
        if ls.sandwich_norm:
            o = rms_norm(b, o, blk.post_attn_norm.weight, eps, f"{pre}.post_attn_norm")
        h, x = norm("mlp_norm", x, o)
        act = ACT_LOWERINGS[spec.act]
        if ls.fused_gate_up:
            gu = lower_linear(b, blk.gate_up_proj, h, f"{pre}.gate_up_proj", opts, shared)
            g, u = b.ops("Split", [gu, b.const([ls.ffn_dim, ls.ffn_dim])], {"axis": -1}, n=2,
                         name=f"{pre}.gate_up_proj/Split")
        else:
            g = lower_linear(b, blk.gate_proj, h, f"{pre}.gate_proj", opts, shared)
            u = lower_linear(b, blk.up_proj, h, f"{pre}.up_proj", opts, shared)
        m = b.op("Mul", [act(b, g, f"{pre}.mlp/act"), u], name=f"{pre}.mlp/Mul")
        delta = lower_linear(b, blk.down_proj, m, f"{pre}.down_proj", opts, shared)
        if ls.sandwich_norm:
            delta = rms_norm(b, delta, blk.post_mlp_norm.weight, eps, f"{pre}.post_mlp_norm")

    h, _ = skip_rms_norm(b, x, delta, gm.get_submodule("norm").weight, eps, "norm")
    logits = lower_linear(b, head, h, HEAD, opts, shared)
    if spec.final_logit_softcap is not None:
        c = b.const(np.float32(spec.final_logit_softcap), np.float32)
        t = b.op("Tanh", [b.op("Div", [logits, c], name="/model/softcap/Div")], name="/model/softcap/Tanh")
        logits = b.op("Mul", [t, c], name="/model/softcap/Mul")
    b.output(logits, "logits", F32, ["batch_size", "sequence_length", spec.vocab_size])
    return b.model(name=f"mcomp-{spec.family}", doc=f"exported by mcomp from {source}",
                   metadata={"mcomp.family": spec.family, "mcomp.source": str(source),
                             "mcomp.accuracy_level": str(opts.accuracy_level)})
