"""Layer-by-layer calibration over the IR.

Calibrating passes (GPTQ, AWQ, FLAP, sensitivity) need, for layer i, the inputs layer i sees
when every layer before it has already been transformed. Running the whole model once per
layer would cost O(L²) and hold everything; instead `LayerwiseRunner` walks the fx graph one
layer segment at a time for all calibration batches:

    runner = LayerwiseRunner(gm, ctx.calibration_batches())
    for i in range(runner.n_layers):
        runner.observe(i, collect)      # see every node's inputs/output in layer i (scratch run)
        ...transform layer i's modules using what `collect` gathered...
        runner.advance(i)               # run layer i for real, with the transformed modules
    logits = runner.finish()            # optional: the rest of the graph

Between layers only the values still live at the layer boundary are kept (per batch: the
residual stream and the rotary tables), so peak memory is about one layer's activations for
the calibration set plus the weights.

The graph must be laid out as [prologue, layer 0, ..., layer L-1, epilogue], which tracing the
canonical model guarantees; a graph whose layer segments interleave is rejected.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import fx

from . import ir

NodeFn = Callable[[fx.Node, tuple, Any], None]   # (node, evaluated args, output)


def _segments(gm: fx.GraphModule) -> tuple[list[fx.Node], list[list[fx.Node]], list[fx.Node]]:
    n_layers = ir.get_spec(gm).n_layers
    pre, layers, post = [], [[] for _ in range(n_layers)], []
    current = -1   # last layer seen
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        layer = node.meta["mcomp"].layer
        if layer is None:
            (pre if current < 0 else post).append(node)
            continue
        if layer < current or (post and layer is not None):
            raise ValueError(f"node '{node.name}' of layer {layer} comes after layer {current}'s "
                             "nodes: the graph is not laid out layer by layer")
        current = layer
        layers[layer].append(node)
    return pre, layers, post


class LayerwiseRunner:
    def __init__(self, gm: fx.GraphModule, batches: Iterable[torch.Tensor]):
        self.gm = gm
        self.pre, self.layers, self.post = _segments(gm)
        self.n_layers = len(self.layers)
        self._interp = fx.Interpreter(gm, garbage_collect_values=False)
        order = {n: k for k, n in enumerate(gm.graph.nodes)}
        self._last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in gm.graph.nodes}
        self._order = order
        self._output = next(n for n in gm.graph.nodes if n.op == "output")
        self.envs: list[dict] = []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        with torch.inference_mode():
            for ids in batches:
                pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
                values = {"input_ids": ids, "positions": pos, "state": None}
                env = {p: values[p.target] for p in placeholders}
                self._run(self.pre, env)
                self.envs.append(env)
        self._next = 0

    @property
    def batches(self) -> int:
        return len(self.envs)

    def _run(self, nodes: list[fx.Node], env: dict, fn: NodeFn | None = None) -> None:
        interp = self._interp
        interp.env = env
        for node in nodes:
            out = interp.run_node(node)
            env[node] = out
            if fn is not None:
                fn(node, interp.fetch_args_kwargs_from_env(node)[0], out)
        # free what no later node needs
        if nodes:
            done = self._order[nodes[-1]]
            for n in [n for n in env if n.op != "placeholder" and self._last_use[n] <= done
                      and n not in self._output.all_input_nodes]:
                del env[n]

    def observe(self, layer: int, fn: NodeFn) -> None:
        """Run layer `layer` on every batch without keeping its results, calling fn(node, args,
        output) for each of its nodes. Use it to gather statistics before transforming the layer."""
        self._check(layer)
        with torch.inference_mode():
            for env in self.envs:
                scratch = dict(env)
                self._run(self.layers[layer], scratch, fn)

    def advance(self, layer: int, fn: NodeFn | None = None) -> None:
        """Run layer `layer` for real (with its current modules) on every batch."""
        self._check(layer)
        with torch.inference_mode():
            for env in self.envs:
                self._run(self.layers[layer], env, fn)
        self._next += 1

    def finish(self) -> list[torch.Tensor]:
        """Run the epilogue (final norm, lm_head) and return each batch's logits."""
        if self._next != self.n_layers:
            raise RuntimeError(f"finish() after {self._next} of {self.n_layers} layers")
        outs = []
        with torch.inference_mode():
            for env in self.envs:
                self._run(self.post, env)
                self._interp.env = env
                outs.append(self._interp.run_node(self._output))
        return outs

    def _check(self, layer: int) -> None:
        if layer != self._next:
            raise RuntimeError(f"layer {layer} requested, but the runner is at layer {self._next}")
