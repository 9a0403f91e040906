"""rotate_v: rotate every KV head's values by an orthonormal Hadamard matrix, folded into the
weights (QuaRot / RotateKV). Exact: the float model computes the same function; the graph and
the spec are unchanged, only v_proj (or the V slice of qkv_proj) and o_proj weights move.

Why: values are quantized per token over groups of channels (KIVI); a few outlier channels set
every token's range. After v ↦ v·R (R Hadamard, D × D) each channel is a ±1/√D mix of all
channels of the head, so the outliers are spread and 2-bit groups lose much less.

The folding, per layer (row-vector convention, v = x·Wᵀ + b, one kv head's block W_h: (D, in)):

    v_h' = v_h·R = x·(Rᵀ·W_h)ᵀ + b_h·R           → W_h ← Rᵀ·W_h,  b_h ← b_h·R

Attention is linear in V: query head j (GQA: it reads kv head j // rep) outputs
o_j = Σ_t p_jt·v'_t = (Σ_t p_jt·v_t)·R = o_j·R. o_proj consumes o_j through its input columns
W_o[:, j·D:(j+1)·D] =: U_j, and o_j·R·(U_j·R)ᵀ = o_j·R·Rᵀ·U_jᵀ = o_j·U_jᵀ, so

                                                   → U_j ← U_j·R   for every query head j

(the same R for every head, so every query head of a GQA group is covered). Nothing between
v_proj and the attention node touches V (no norm, no RoPE), and nothing between the attention
and o_proj mixes heads, which is what makes this exact. Keys cannot be folded the same way:
RoPE sits between k_proj and the cache; see KVSpec.k_rotation for the online key rotation.

Runs on float weights (stage "transform", before weight quantization): a quantized o_proj
cannot absorb R. Note the normalized Sylvester matrix is symmetric and its own inverse, so
running this pass twice restores the original weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..compiler import ir
from ..compiler.hadamard import hadamard
from ..compiler.passes import Pass, PassConfig, PassResult, register_pass
from ..errors import ConfigError, PassError

ROTATIONS = ("hadamard",)


@dataclass(frozen=True)
class RotateVConfig(PassConfig):
    rotation: str = "hadamard"
    version: int = 1

    def __post_init__(self):
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"rotate_v: rotation '{self.rotation}' not in {', '.join(ROTATIONS)}")


@register_pass
class RotateV(Pass):
    name = "rotate_v"
    Config = RotateVConfig
    exact = True
    stage = "transform"

    def rotation(self, head_dim: int) -> torch.Tensor:
        """(D, D) orthonormal matrix applied to every KV head's values (float64)."""
        return hadamard(head_dim, torch.float64)

    def _layer_nodes(self, gm: fx.GraphModule) -> dict[int, dict[str, fx.Node]]:
        """layer → {"v": v_proj or qkv_proj node, "o": o_proj node}, all float nn.Linear."""
        found: dict[int, dict[str, fx.Node]] = {}
        for node in ir.nodes_by_role(gm, "v_proj", "qkv_proj", "o_proj"):
            info = node.meta["mcomp"]
            slot = "o" if info.role == "o_proj" else "v"
            if slot in found.setdefault(info.layer, {}):
                raise PassError(f"layer {info.layer} has more than one {info.role}", node=node.name)
            if type(gm.get_submodule(node.target)) is not nn.Linear:
                raise PassError(f"layer {info.layer}: {info.role} is not a float nn.Linear; rotate "
                                "before weight quantization (stage 'transform')", node=node.name)
            found[info.layer][slot] = node
        spec = ir.get_spec(gm)
        for layer in range(spec.n_layers):
            if set(found.get(layer, {})) != {"v", "o"}:
                raise PassError(f"layer {layer}: needs a v_proj (or qkv_proj) and an o_proj")
        return found

    def check(self, gm: fx.GraphModule) -> None:
        self._layer_nodes(gm)

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        spec = ir.get_spec(gm)
        nodes = self._layer_nodes(gm)
        for layer, ls in enumerate(spec.layers):
            D = ls.head_dim
            R = self.rotation(D)                                         # (D, D) float64
            v_node = nodes[layer]["v"]
            v = gm.get_submodule(v_node.target)
            # V rows: all of v_proj, or the last kv_dim rows of qkv_proj ([q | k | v] split)
            v0 = ls.q_dim + ls.kv_dim if v_node.meta["mcomp"].role == "qkv_proj" else 0
            rows = slice(v0, v0 + ls.kv_dim)
            w = v.weight[rows].double().unflatten(0, (ls.n_kv_heads, D))   # (Hkv, D, in)
            v.weight[rows] = (R.T @ w).flatten(0, 1).to(v.weight.dtype)    # W_h ← Rᵀ·W_h
            if v.bias is not None:
                b = v.bias[rows].double().view(ls.n_kv_heads, D)           # (Hkv, D)
                v.bias[rows] = (b @ R).flatten().to(v.bias.dtype)          # b_h ← b_h·R
            o = gm.get_submodule(nodes[layer]["o"].target)
            u = o.weight.double().unflatten(1, (ls.n_heads, D))            # (out, Hq, D)
            o.weight.copy_((u @ R).flatten(1).to(o.weight.dtype))          # U_j ← U_j·R
        head_dims = sorted({ls.head_dim for ls in spec.layers})
        return PassResult(gm, {"rotated_layers": spec.n_layers, "rotation": self.config.rotation,
                               "head_dims": head_dims})
