"""Lowerings: each canonical op or weight format → ONNX nodes and tensor layouts.

Three registries, so that a new weight format or KV representation is one function here, not a
branch in the emitter:

- `WEIGHT_LOWERINGS`: linear module type → (builder, module, x, name) → y. Float `nn.Linear` →
  MatMul; `QuantLinear` (RTN/GPTQ/AWQ/HQQ, any mix per linear) → MatMulNBits.
- `EMBED_LOWERINGS`: embedding module type → ids → hidden. Float → Gather; `QuantEmbedding`
  → GatherBlockQuantized (the tied head then reads the same bytes through MatMulNBits).
- `KV_LOWERINGS`: KV kind → the attention node. Dense fp32 → GroupQueryAttention with past /
  present KV; every other kind is refused by name (`check_exportable`).

MatMulNBits numerics (onnxruntime 1.32, CPU; probed and pinned by tests/codegen/test_onnx.py):
bits ∈ {2, 4, 8}, block_size a power of two ≥ 16, w = (q − zp)·scale with zp uint8-packed at
the same bit width or (2/4-bit only) float. mcomp's formats map onto that exactly:
- 3-bit codes are re-packed as 4-bit codes with the same values and zero points (exact);
- groups are written as blocks of a power of two dividing the group (any, per-channel), with
  each group's scale and zero repeated per block (exact); `choose_block` picks the smallest file;
- integer zero points (RTN/GPTQ/AWQ) are packed uint8; fractional ones (HQQ) stay float;
- fp16/bf16 scales are widened to fp32 (exact), the graph's activation type.
Refused, one line each: 8-bit with fractional zeros, groups with no power-of-two divisor ≥ 16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_ir as ir
import torch
from torch import nn

from ...errors import ExportError
from ...quant import primitives as P
from ...quant.embedding import QuantEmbedding
from ...quant.linear import QuantLinear
from .graph import MS, GraphBuilder
from .options import ExportOptions

F32 = ir.DataType.FLOAT


class TypeRegistry:
    """Module type → lowering, looked up along the MRO (QuantEmbedding before QuantLinear)."""

    def __init__(self, what: str):
        self.what = what
        self._fns: dict[type, Callable] = {}

    def register(self, cls: type):
        def add(fn):
            self._fns[cls] = fn
            return fn
        return add

    def get(self, mod: nn.Module, where: str) -> Callable:
        for cls in type(mod).__mro__:
            if cls in self._fns:
                return self._fns[cls]
        known = ", ".join(sorted(c.__name__ for c in self._fns))
        raise ExportError(f"{where}: no ONNX lowering for {self.what} {type(mod).__name__} "
                          f"(lowerable: {known})")


WEIGHT_LOWERINGS = TypeRegistry("linear")
EMBED_LOWERINGS = TypeRegistry("embedding")


# ----------------------------------------------------------------------------- packing

BLOCKS = (16, 32, 64, 128, 256)     # MatMulNBits block sizes (powers of two >= 16)


def choose_block(g: int, K: int, bits: int) -> int | None:
    """The MatMulNBits block for groups of g columns in rows of K: a power of two that divides
    g (so each block lies in one group and takes its scale), or any block for one group per
    row; among those the one with the fewest bytes per row, since rows are padded to whole
    blocks and every block stores an fp32 scale (SmolLM2's K=576 at g128: blocks of 64, no
    padding, 328.5 B per row against 342.5 B with blocks of 128)."""
    fits = [b for b in BLOCKS if g >= K or g % b == 0]
    if not fits:
        return None

    def row_bytes(b):
        nb = -(-K // b)
        return nb * b * bits / 8 + nb * 4 + nb * bits / 8

    return min(fits, key=lambda b: (row_bytes(b), -b))


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes → (N, K·bits/8) bytes, little end first (mcomp's and MatMulNBits' order)."""
    return P.pack(codes, bits)


@dataclass
class NBitsLayout:
    """One QuantLinear in MatMulNBits' layout."""

    bits: int
    block: int
    n_blocks: int
    B: torch.Tensor            # (N, n_blocks, block·bits/8) uint8
    scales: torch.Tensor       # (N, n_blocks) fp32
    zeros: torch.Tensor | None  # (N, ceil(n_blocks·bits/8)) uint8, (N, n_blocks) fp32, or None
    widened: bool              # 3-bit codes written as 4-bit


def nbits_layout(mod: QuantLinear, where: str) -> NBitsLayout:
    s = mod.scheme
    N, K = mod.out_features, mod.in_features
    g = s.effective_group(K)
    bits = 4 if s.bits == 3 else s.bits
    block = choose_block(g, K, bits)
    if block is None:
        raise ExportError(f"{where}: group size {g} has no power-of-two divisor >= 16; "
                          "MatMulNBits needs block_size = 2^k >= 16 (re-quantize with g32/g64/g128)")
    nb = -(-K // block)
    group_of_block = torch.arange(nb) * block // g          # block j lies inside one group
    codes = torch.nn.functional.pad(mod.codes(), (0, nb * block - K))          # (N, nb·block)
    B = _pack(codes, bits).view(N, nb, block * bits // 8)
    scales = mod.scales.float()[:, group_of_block].contiguous()                 # (N, nb)
    zeros = None
    zp = mod.zero_points()[:, group_of_block]                                   # (N, nb) fp32
    implicit = s.symmetric and bits == s.bits        # onnxruntime's default zp is 2^(bits-1)
    if not implicit:
        integral = bool(((zp == zp.round()) & (zp >= 0) & (zp <= 2 ** bits - 1)).all())
        if integral:
            per = 8 // bits
            zq = torch.nn.functional.pad(zp.to(torch.uint8), (0, -nb % per))
            zeros = _pack(zq, bits)[:, : -(-nb // per)].contiguous()
        elif bits == 8:
            raise ExportError(f"{where}: 8-bit weights with fractional zero points ({s.label()}); "
                              "onnxruntime's MatMulNBits takes 8-bit zero points as uint8 only")
        else:
            zeros = zp.contiguous()
    return NBitsLayout(bits, block, nb, B.contiguous(), scales, zeros, bits != s.bits)


# ----------------------------------------------------------------------------- weights

@WEIGHT_LOWERINGS.register(nn.Linear)
def lower_float_linear(b: GraphBuilder, mod: nn.Linear, x: ir.Value, name: str,
                       opts: ExportOptions, shared: dict) -> ir.Value:
    wt = shared.get(id(mod.weight))
    if wt is None:   # (in, out): MatMul's layout, no Transpose in the graph
        wt = b.init(f"{name}.weight_t", mod.weight.detach().float().t().contiguous())
    y = b.op("MatMul", [x, wt], name=f"{name}/MatMul")
    if mod.bias is not None:
        y = b.op("Add", [y, b.init(f"{name}.bias", mod.bias.detach().float())], name=f"{name}/Add")
    return y


def nbits_inputs(b: GraphBuilder, mod: QuantLinear, name: str, shared: dict):
    """Initializers of a QuantLinear in MatMulNBits layout; the tied table's are made once."""
    key = id(mod.qweight)
    if key not in shared:
        lay = nbits_layout(mod, name)
        shared[key] = (lay, b.init(f"{name}.qweight", lay.B), b.init(f"{name}.scales", lay.scales),
                       None if lay.zeros is None else b.init(f"{name}.zero_points", lay.zeros))
    return shared[key]


@WEIGHT_LOWERINGS.register(QuantLinear)
def lower_quant_linear(b: GraphBuilder, mod: QuantLinear, x: ir.Value, name: str,
                       opts: ExportOptions, shared: dict) -> ir.Value:
    lay, B, S, Z = nbits_inputs(b, mod, name, shared)
    y = b.op("MatMulNBits", [x, B, S] + ([Z] if Z is not None else []),
             {"K": mod.in_features, "N": mod.out_features, "bits": lay.bits,
              "block_size": lay.block, "accuracy_level": opts.accuracy_level},
             name=f"{name}/MatMulNBits", domain=MS)
    if mod.bias is not None:
        y = b.op("Add", [y, b.init(f"{name}.bias", mod.bias.detach().float())], name=f"{name}/Add")
    return y


def lower_linear(b, mod, x, name, opts, shared):
    return WEIGHT_LOWERINGS.get(mod, name)(b, mod, x, name, opts, shared)


# ----------------------------------------------------------------------------- embeddings

@EMBED_LOWERINGS.register(nn.Embedding)
def lower_float_embedding(b: GraphBuilder, mod: nn.Embedding, ids: ir.Value, name: str,
                          opts: ExportOptions, shared: dict, tied_head) -> ir.Value:
    table = b.init(f"{name}.weight", mod.weight.detach().float())
    if tied_head is not None:
        # the head reads the same table: MatMul(h, Transpose(E)); onnxruntime folds the
        # Transpose at load, the file holds the table once
        shared[id(mod.weight)] = b.op("Transpose", [table], {"perm": [1, 0]},
                                      name=f"{name}/Transpose")
    return b.op("Gather", [table, ids], {"axis": 0}, name=f"{name}/Gather")


@EMBED_LOWERINGS.register(QuantEmbedding)
def lower_quant_embedding(b: GraphBuilder, mod: QuantEmbedding, ids: ir.Value, name: str,
                          opts: ExportOptions, shared: dict, tied_head) -> ir.Value:
    lay = nbits_layout(mod, name)
    gatherable = lay.bits in (4, 8) and (lay.zeros is None or lay.zeros.dtype == torch.uint8)
    if not gatherable:
        # GatherBlockQuantized takes 4/8-bit codes with uint8 zero points only: gather from the
        # exactly dequantized table instead (bigger file, same values)
        table = b.init(f"{name}.weight", mod.dequantize())
        return b.op("Gather", [table, ids], {"axis": 0}, name=f"{name}/Gather")
    V, H = mod.out_features, mod.in_features
    _, B, S, Z = nbits_inputs(b, tied_head if tied_head is not None else mod, name, shared)
    flat = b.op("Reshape", [B, b.const([V, lay.n_blocks * lay.block * lay.bits // 8])],
                name=f"{name}/Reshape")
    y = b.op("GatherBlockQuantized", [flat, ids, S] + ([Z] if Z is not None else []),
             {"bits": lay.bits, "block_size": lay.block, "gather_axis": 0, "quantize_axis": 1},
             name=f"{name}/GatherBlockQuantized", domain=MS)
    if lay.n_blocks * lay.block != H:   # rows are padded to whole blocks
        y = b.op("Slice", [y, b.const([0]), b.const([H]), b.const([-1])], name=f"{name}/Slice")
    return y


# ----------------------------------------------------------------------------- norms, acts

def rms_norm(b: GraphBuilder, x: ir.Value, weight: torch.Tensor, eps: float, name: str) -> ir.Value:
    w = b.init(f"{name}.weight", weight.detach().float())
    # the standard opset-23 op (onnx.checker knows it; onnxruntime runs it with its
    # SimplifiedLayerNormalization kernel): x / sqrt(mean(x²) + eps) · w in fp32
    return b.op("RMSNormalization", [x, w], {"axis": -1, "epsilon": float(eps), "stash_type": 1},
                name=f"{name}/RMSNormalization")


def skip_rms_norm(b: GraphBuilder, x: ir.Value, skip: ir.Value, weight: torch.Tensor, eps: float,
                  name: str) -> tuple[ir.Value, ir.Value]:
    """(norm(x + skip), x + skip): the residual add fused into the next norm."""
    w = b.init(f"{name}.weight", weight.detach().float())
    outs = b.ops("SkipSimplifiedLayerNormalization", [x, skip, w], {"epsilon": float(eps)},
                 n=4, name=f"{name}/SkipSimplifiedLayerNorm", domain=MS)
    return outs[0], outs[3]


def _silu(b, x, name):
    return b.op("Mul", [x, b.op("Sigmoid", [x], name=f"{name}/Sigmoid")], name=f"{name}/Mul")


ACT_LOWERINGS: dict[str, Callable] = {
    "silu": _silu,
    "gelu": lambda b, x, name: b.op("Gelu", [x], name=f"{name}/Gelu"),
    "gelu_tanh": lambda b, x, name: b.op("Gelu", [x], {"approximate": "tanh"}, name=f"{name}/Gelu"),
    "relu": lambda b, x, name: b.op("Relu", [x], name=f"{name}/Relu"),
}


# ----------------------------------------------------------------------------- attention / KV

def gqa_window(window: int | None) -> int:
    """mcomp's window W attends to keys with q − k < W (W keys, itself included), as in
    transformers; GroupQueryAttention's local_window_size takes the same W (measured: W − 1 and
    W + 1 both break the gemma3 parity test, W passes; the builder also passes sliding_window)."""
    return -1 if window is None else int(window)


def lower_dense_attention(b: GraphBuilder, *, q, k, v, past_k, past_v, seqlens_k, total_len,
                          rope, ls, scale: float, name: str):
    ins = [q, k, v, past_k, past_v, seqlens_k, total_len]
    if rope is not None:
        ins += list(rope)
    outs = b.ops("GroupQueryAttention", ins,
                 {"num_heads": ls.n_heads, "kv_num_heads": ls.n_kv_heads, "scale": float(scale),
                  "do_rotary": int(rope is not None), "rotary_interleaved": 0,
                  "local_window_size": gqa_window(ls.window)},
                 n=3, name=f"{name}/GroupQueryAttention", domain=MS)
    return outs


KV_LOWERINGS: dict[str, Callable] = {"dense": lower_dense_attention}


def check_exportable(spec) -> None:
    """Refuse, by name, every KV representation onnxruntime's attention cannot express."""
    for i, ls in enumerate(spec.layers):
        kind = ls.kv.kind
        if kind not in KV_LOWERINGS:
            raise ExportError(
                f"layer {i} stores its KV cache as '{ls.kv.label()}': onnxruntime's "
                "GroupQueryAttention has no kernel for it; exportable: dense fp32 KV (export the "
                "artifact compiled without --kv, and choose KV precision in onnxruntime-genai)")
        if kind == "dense" and ls.kv.params.dtype != "float32":
            raise ExportError(
                f"layer {i} stores its KV cache as '{ls.kv.label()}': the exported graph runs in "
                "fp32 and GroupQueryAttention's past KV has the activations' type; exportable: "
                "dense fp32 KV")
