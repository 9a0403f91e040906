"""A thin graph builder over onnx-ir's Tape: hierarchical node names, typed graph inputs and
outputs, cached constants and numpy/torch initializers.

Why onnx-ir and not `onnx.helper`: values are objects (no string plumbing between nodes),
initializers keep their numpy buffers until `ir.save` streams them to external data (no
protobuf copy of every weight in memory), and the same model object is what onnx-ir's
passes and serializer work on.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir import tape as _tape

MS = "com.microsoft"       # onnxruntime's contrib-op domain
OPSET = 23                 # standard opset: RMSNormalization is 23, Gelu(approximate) 20
IR_VERSION = 11


class GraphBuilder:
    def __init__(self):
        self.tape = _tape.Tape()
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self._consts: dict = {}
        self._names: set[str] = set()

    # ------------------------------------------------------------------ values
    def input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
        v = ir.val(name, dtype, list(shape))
        self.inputs.append(v)
        return v

    def output(self, v: ir.Value, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> None:
        v.name = name
        v.dtype = dtype
        v.shape = ir.Shape(list(shape))
        self.outputs.append(v)

    def init(self, name: str, array: np.ndarray | torch.Tensor) -> ir.Value:
        """A weight initializer (written to external data by `ir.save`)."""
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().contiguous().numpy()
        if name in self._names:
            raise ValueError(f"duplicate initializer name {name!r}")
        self._names.add(name)
        return self.tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name))

    def const(self, values, dtype=np.int64) -> ir.Value:
        """A small constant (shape, axes, scalars), one initializer per distinct value."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            flat = "_".join(str(x) for x in arr.reshape(-1)[:8].tolist())
            name = f"/const/{arr.dtype.name}/{list(arr.shape)}/{flat}"
            self._consts[key] = self.init(name, arr)
        return self._consts[key]

    # ------------------------------------------------------------------ nodes
    def _name(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: Mapping | None = None, *,
           name: str, domain: str = "") -> ir.Value:
        name = self._name(name)
        out = self.tape.op(op_type, list(inputs), dict(attrs or {}), domain=domain, name=name)
        out.name = f"{name}/output_0"
        return out

    def ops(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: Mapping | None = None, *,
            n: int, name: str, domain: str = "") -> Sequence[ir.Value]:
        name = self._name(name)
        outs = self.tape.op_multi_out(op_type, list(inputs), dict(attrs or {}), num_outputs=n,
                                      domain=domain, name=name)
        for i, o in enumerate(outs):
            o.name = f"{name}/output_{i}"
        return outs

    # ------------------------------------------------------------------ model
    def model(self, *, name: str, doc: str, metadata: Mapping[str, str]) -> ir.Model:
        graph = ir.Graph(self.inputs, self.outputs, nodes=self.tape.nodes,
                         initializers=self.tape.initializers,
                         opset_imports={"": OPSET, MS: 1}, name=name)
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="mcomp", doc_string=doc,
                        metadata_props=dict(metadata))
