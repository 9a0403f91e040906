"""Shared rewrite for the exact fusion passes: sibling linears that read the same input become
one linear whose output is split. One wider GEMM instead of several narrow ones: fewer kernel
launches and one read of the activations per block, which matters most in decode."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..compiler import ir
from ..errors import PassError


def fuse_siblings(gm: fx.GraphModule, roles: tuple[str, ...], fused_role: str,
                  fused_name: str, spec_flag: str) -> dict:
    """For every layer, fuse the linears with `roles` (in that order) into `layers.i.<fused_name>`."""
    spec = ir.get_spec(gm)
    by_layer: dict[int, dict[str, fx.Node]] = {}
    for node in ir.nodes_by_role(gm, *roles):
        by_layer.setdefault(node.meta["mcomp"].layer, {})[node.meta["mcomp"].role] = node
    fused = 0
    for layer, nodes in sorted(by_layer.items()):
        parts = [nodes[r] for r in roles if r in nodes]
        if len(parts) != len(roles):
            continue
        mods = [gm.get_submodule(n.target) for n in parts]
        if not all(type(m) is nn.Linear for m in mods):
            raise PassError("fusion needs float nn.Linear modules; run it before quantization",
                            node=parts[0].name)
        src = {n.args[0] for n in parts}
        if len(src) != 1:
            raise PassError(f"layer {layer}: {roles} do not share an input", node=parts[0].name)
        has_bias = [m.bias is not None for m in mods]
        if len(set(has_bias)) != 1:
            raise PassError(f"layer {layer}: mixed biases in {roles}", node=parts[0].name)
        new = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=has_bias[0])
        with torch.no_grad():
            new.weight.copy_(torch.cat([m.weight for m in mods]))
            if has_bias[0]:
                new.bias.copy_(torch.cat([m.bias for m in mods]))
        new.mcomp_role, new.mcomp_layer = fused_role, layer
        target = f"layers.{layer}.{fused_name}"
        gm.add_submodule(target, new)
        with gm.graph.inserting_before(parts[0]):
            fnode = gm.graph.call_module(target, (parts[0].args[0],))
            split = gm.graph.call_method("split", (fnode, [m.out_features for m in mods]),
                                         {"dim": -1})
            pieces = [gm.graph.call_function(operator.getitem, (split, j)) for j in range(len(parts))]
            # the split and its pieces belong to the layer (LayerwiseRunner needs every node
            # between a layer's first and last node to carry that layer)
            for new_node in (split, *pieces):
                new_node.meta["nn_module_stack"] = dict(parts[0].meta.get("nn_module_stack") or {})
            for n, piece in zip(parts, pieces):
                n.replace_all_uses_with(piece)
        for n in parts:
            gm.graph.erase_node(n)
            gm.delete_submodule(n.target)
        spec = spec.with_layer(layer, **{spec_flag: True})
        fused += 1
    gm.graph.lint()
    gm.recompile()
    ir.set_spec(gm, spec)
    return {"fused_layers": fused}
