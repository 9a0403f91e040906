"""The Python API. The CLI is a thin layer over these functions.

    import mcomp
    result = mcomp.optimize("smollm2-135m", recipe="int4", out="out/smollm2-int4")
    session = mcomp.load("out/smollm2-int4")
    print(session.generate("It is a truth universally acknowledged", max_new_tokens=30))
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import fx

from . import data
from .compiler import ir
from .compiler.context import CompileContext
from .compiler.frontend import DEFAULT_MODEL, import_model
from .compiler.manager import PassManager, Report
from .errors import ConfigError
from .compiler.recipe import (Recipe, parse_budget_flags, parse_kv_flag, parse_prune_flag,
                              parse_weights_flag)

from .runtime import kv as kvrep
from .runtime.session import Session
from .runtime.tokenizer import Tokenizer


@dataclass
class CompileResult:
    gm: fx.GraphModule
    report: Report
    recipe: Recipe
    tokenizer: Tokenizer
    tokenizer_dir: Path
    artifact: Path | None = None

    def session(self) -> Session:
        return Session(self.gm, self.tokenizer)


def is_artifact(target: str | os.PathLike) -> bool:
    return Path(target).is_dir() and (Path(target) / "manifest.json").is_file()


def load(target: str | os.PathLike = DEFAULT_MODEL) -> Session:
    """A runnable Session over an artifact directory or any model source (name, HF folder, GGUF)."""
    if is_artifact(target):
        from .codegen import load_artifact
        art = load_artifact(target)
        spec = ir.get_spec(art.gm)
        tok = Tokenizer.from_dir(art.tokenizer_dir, spec) if art.tokenizer_dir is not None else None
        return Session(art.gm, tok)
    return Session.from_model(target)


def resolve_recipe(recipe: Recipe | str | os.PathLike | None = None, weights: str | None = None,
                   prune: str | None = None, kv: str | None = None, *,
                   weight_budget: str | int | None = None,
                   weight_bits: float | None = None) -> Recipe:
    """A Recipe object, a preset name, or a TOML path (default preset: int4); then shorthands
    (`weights="rtn:4:g128"`, `prune="flap:0.2"` / `"layers:4"`), each replacing its stage.
    `weight_budget` (total weight bytes: an int or "60MB") or `weight_bits` (average bits per
    quantized weight) make the weight stage a mixed-precision plan, `weights` then names its
    quantizer only (`"hqq"`)."""
    if isinstance(recipe, Recipe):
        r = recipe
    elif recipe is None:
        r = Recipe.preset("int4")
    elif str(recipe).endswith(".toml") or Path(recipe).is_file():
        r = Recipe.from_file(recipe)
    else:
        r = Recipe.preset(str(recipe))
    if weight_budget is not None or weight_bits is not None:
        r = r.replace_stage(parse_budget_flags(weights, weight_budget, weight_bits))
    elif weights:
        r = r.replace_stage(parse_weights_flag(weights))
    if prune:
        r = r.replace_stage(parse_prune_flag(prune))
    if kv:  # `kivi2` / `kivi4`: replaces the kv stage (assign_kv); `:hv` adds rotate_v
        from .passes.assign_kv import with_kv_passes
        r = with_kv_passes(r, parse_kv_flag(kv))
    return r


def optimize(model: str | os.PathLike = DEFAULT_MODEL, recipe: Recipe | str | os.PathLike | None = None,
             *, weights: str | None = None, prune: str | None = None, kv: str | None = None,
             weight_budget: str | int | None = None, weight_bits: float | None = None,
             calib: str | os.PathLike | None = None,
             out: str | os.PathLike | None = None,
             emit: str | tuple[str, ...] | None = None, emit_options: dict | None = None,
             on_pass: Callable[[int, int, str], None] | None = None,
             on_layer: Callable[[int, int, dict], None] | None = None) -> CompileResult:
    """Import `model`, run the recipe's passes (verified after each), optionally write an artifact.

    `weight_budget="60MB"` (total weight bytes after compression) or `weight_bits=3.5` plan
    mixed precision (see docs/recipes.md); `on_layer(layer, n_layers, stats)` is given to every
    pass with a per-layer progress hook (calibrated quantizers, mixed-precision sensitivity).
    `emit="safetensors,onnx"` also writes the ONNX export into the artifact folder (one atomic
    write); `emit="onnx"` writes only the export (codegen/emit.py); `emit_options` maps an
    emitter to its options, e.g. {"onnx": {"accuracy_level": 0}}."""
    from .codegen.emit import ARTIFACT, parse_emit
    formats = parse_emit(emit)          # bad --emit fails before the compile, not after it
    r = resolve_recipe(recipe, weights, prune, kv, weight_budget=weight_budget,
                       weight_bits=weight_bits)
    if on_layer is not None:
        for p in r.passes:
            if hasattr(p, "on_layer"):
                p.on_layer = on_layer
    calib_text = data.read_text(calib) if calib is not None else data.calibration_text()
    imported = import_model(model)
    gm = ir.build(imported.spec, imported.state_dict)
    del imported.state_dict  # the GraphModule owns the weights now
    tok = Tokenizer.from_dir(imported.hf_dir, imported.spec)
    ctx = CompileContext.from_text(lambda t: tok.encode(t, add_bos=False), calib_text,
                                   probe_text=data.evaluation_text(), bos_id=tok.bos_id,
                                   config=r.calibration,
                                   calib_source=str(calib) if calib is not None else "embedded")
    gm, report = PassManager(r.passes, verify=r.verify, on_pass=on_pass).run(gm, ctx, str(model))
    result = CompileResult(gm=gm, report=report, recipe=r, tokenizer=tok, tokenizer_dir=imported.hf_dir)
    if out is not None:
        from .codegen import save_artifact
        from .codegen.emit import EmitContext, write_export
        if ARTIFACT in formats:
            result.artifact = save_artifact(gm, out, tokenizer_dir=imported.hf_dir, source=str(model),
                                            report=report, recipe=r.to_dict(), emit=formats,
                                            emit_options=emit_options)
        else:
            ectx = EmitContext(source=str(model), tokenizer_dir=Path(imported.hf_dir),
                               options=dict(emit_options or {}))
            result.artifact = write_export(gm, out, formats, ctx=ectx)
    return result


def export(artifact: str | os.PathLike, out: str | os.PathLike, format: str = "onnx",
           options: dict | None = None) -> Path:
    """Export a written mcomp artifact (verified on load) to another target's folder, e.g.
    `export("out/smollm2-int4", "out/smollm2-int4-onnx")` → model.onnx + genai_config.json +
    tokenizer files, written atomically."""
    from .codegen import load_artifact
    from .codegen.emit import ARTIFACT, EmitContext, parse_emit, write_export
    formats = parse_emit(format)
    if ARTIFACT in formats:
        raise ConfigError(f"{artifact} is already an mcomp artifact; export it to another format "
                          "(onnx)")
    loaded = load_artifact(artifact)
    ectx = EmitContext(source=str(loaded.path), tokenizer_dir=loaded.tokenizer_dir,
                       options={f: options for f in formats} if options else {})
    return write_export(loaded.gm, out, formats, ctx=ectx)


def _scheme_label(mod) -> str:
    scheme = getattr(mod, "scheme", None)
    return "fp32" if scheme is None else scheme.label()


COST_CONTEXTS = (2048, 8192)


def inspect(target: str | os.PathLike = DEFAULT_MODEL) -> dict:
    """Per-layer structure, weight bytes and schemes, KV bytes per token; plus totals; every
    linear's format; for a mixed-precision artifact its plan with predicted vs measured bytes."""
    from .quant.mixed import linear_formats, plan_summary
    manifest = None
    if is_artifact(target):
        from .codegen import load_artifact
        art = load_artifact(target)
        gm, manifest = art.gm, art.manifest
    else:
        imported = import_model(target)
        gm = ir.build(imported.spec, imported.state_dict)
    spec = ir.get_spec(gm)
    layers = []
    for i, ls in enumerate(spec.layers):
        block = gm.get_submodule(f"layers.{i}")
        schemes = sorted({getattr(m, "scheme").label() if hasattr(m, "scheme") else "fp32"
                          for m in block.modules() if getattr(m, "mcomp_role", None) in ir.LINEAR_ROLES})
        kv_bpt = kvrep.bytes_per_token(ls)
        layers.append({"layer": i, "heads": ls.n_heads, "kv_heads": ls.n_kv_heads,
                       "head_dim": ls.head_dim, "ffn": ls.ffn_dim, "window": ls.window,
                       "weight_bytes": ir.module_bytes(block), "schemes": schemes,
                       "kv": ls.kv.kind, "kv_label": ls.kv.label(), "kv_bytes_per_token": kv_bpt,
                       # the kind's cost model: one decode step over COST_CONTEXTS tokens
                       "kv_decode_cost": {n: kvrep.decode_cost(ls, n).to_dict()
                                          for n in COST_CONTEXTS}})
    other = ir.weight_bytes(gm) - sum(l["weight_bytes"] for l in layers)
    return {"target": str(target), "family": spec.family, "layers": layers,
            "totals": {"weight_bytes": ir.weight_bytes(gm),
                       "linear_weight_bytes": ir.linear_weight_bytes(gm),
                       "embedding_and_head_bytes": other,
                       # calibrated KV-kind tensors (palu factors, think channels), in the blocks
                       "kv_state_bytes": sum(ir.module_bytes(m) for n, m in gm.named_modules()
                                             if n.endswith(".kv_state")),
                       "kv_bytes_per_token": sum(l["kv_bytes_per_token"] for l in layers),
                       "kv_decode_cost": {n: {k: sum(l["kv_decode_cost"][n][k] for l in layers)
                                              for k in ("bytes_read", "flops")}
                                          for n in COST_CONTEXTS},
                       "n_layers": spec.n_layers, "vocab_size": spec.vocab_size,
                       "hidden_size": spec.hidden_size, "tie_embeddings": spec.tie_embeddings,
                       "embedding": _scheme_label(gm.get_submodule("embed")),
                       "lm_head": _scheme_label(gm.get_submodule("lm_head"))},
            "linears": linear_formats(gm),
            "mixed": plan_summary(manifest, gm),
            "manifest": None if manifest is None else {
                "format_version": manifest.get("format_version"), "source": manifest.get("source"),
                "passes": [p.get("name") for p in (manifest.get("report") or {}).get("passes", [])]}}
