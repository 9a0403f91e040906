"""The `onnx` emitter: model.onnx + model.onnx.data (external weights) + genai_config.json, a
folder onnxruntime runs and `onnxruntime_genai.Model(folder)` generates from.

    export_onnx(gm, "out/onnx", tokenizer_dir=...)          # an export folder (atomic)
    save_artifact(gm, out, ..., emit=("safetensors", "onnx"))  # next to the mcomp artifact

Lowerings live in lowering.py (registries by weight module type and KV kind), the graph in
model.py, the genai config in genai.py.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping

from torch import fx

from ...compiler import ir as mir
from ...errors import ConfigError, ExportError
from ..emit import EMITTERS, EmitContext, write_export
from .options import ExportOptions

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_FILE = "genai_config.json"


def _options(value: Any, spec) -> ExportOptions:
    if isinstance(value, ExportOptions):
        return value
    d = dict(value or {})
    d.setdefault("max_length", min(spec.max_positions, ExportOptions.max_length))
    unknown = set(d) - {f.name for f in dataclasses.fields(ExportOptions)}
    if unknown:
        raise ExportError(f"onnx export: unknown option(s) {sorted(unknown)}; valid: "
                          "accuracy_level, max_length")
    return ExportOptions(**d)


def onnx_model(gm: fx.GraphModule, options: ExportOptions | Mapping | None = None, source: str = ""):
    """The onnx-ir Model of `gm` (not written)."""
    from .model import build_model
    return build_model(gm, _options(options, mir.get_spec(gm)), source=source)


class OnnxEmitter:
    name = "onnx"

    def check(self, gm: fx.GraphModule, ctx: EmitContext) -> None:
        if importlib.util.find_spec("onnx_ir") is None:
            raise ConfigError("the onnx emitter needs onnx-ir and onnxruntime: "
                              "pip install 'mcomp[onnx]'")
        from .model import check_model
        spec = mir.get_spec(gm)
        check_model(spec)
        _options(ctx.options.get(self.name), spec)

    def write(self, gm: fx.GraphModule, tmp: Path, ctx: EmitContext) -> list[str]:
        import json

        import onnx_ir as ir

        from .genai import genai_config
        spec = mir.get_spec(gm)
        opts = _options(ctx.options.get(self.name), spec)
        model = onnx_model(gm, opts, ctx.source)
        # weights as external data: a 2 GB protobuf limit never applies, onnxruntime mmaps them
        ir.save(model, tmp / MODEL_FILE, external_data=DATA_FILE)
        with open(tmp / GENAI_FILE, "w", encoding="utf-8") as f:
            json.dump(genai_config(spec, opts, MODEL_FILE), f, indent=2)
            f.write("\n")
        return [MODEL_FILE, DATA_FILE, GENAI_FILE]


EMITTERS.register("onnx", OnnxEmitter())


def export_onnx(gm: fx.GraphModule, out_dir: str | os.PathLike, *,
                options: ExportOptions | Mapping | None = None,
                tokenizer_dir: str | os.PathLike | None = None, source: str = "",
                overwrite: bool = True) -> Path:
    """Write `gm` as an ONNX export folder at `out_dir` atomically; returns its path."""
    opts = _options(options, mir.get_spec(gm))
    ctx = EmitContext(source=source, tokenizer_dir=None if tokenizer_dir is None else Path(tokenizer_dir),
                      options={"onnx": opts})
    return write_export(gm, out_dir, ("onnx",), ctx=ctx, overwrite=overwrite)


__all__ = ["ExportOptions", "export_onnx", "onnx_model", "OnnxEmitter"]
