"""assign_kv: choose each layer's KV representation (LayerSpec.kv), e.g. KIVI 2/4-bit.

Only the spec changes: the runtime builds the matching cache from it (runtime/kv/, one file per
kind) and the artifact manifest stores it per layer. The pass knows no kind: its config is a
`--kv` shorthand (`kivi2:s4`, `dense:bf16`, ...) that runtime.kv.parse_kv resolves through the
registry. The PassManager verifies this pass through real caches (prefill, then decode past
the kind's lossy window; compiler/verify.py), so its drift in the report is measured.

A shorthand may also ask for weight rewrites (KIVI's `:hv` adds rotate_v, a Hadamard rotation
of V folded into v_proj/o_proj, stage "transform"); `kv_passes` returns them before assign_kv.
This module is the one place where `--kv` text becomes passes: optimize (via the recipe), eval,
eval --passkey and the benchmarks all call `kv_passes` / `apply_kv_flag`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from ..compiler import ir
from ..compiler.passes import PASSES, STAGES, Pass, PassConfig, PassResult, register_pass
from ..errors import ConfigError
from ..runtime.kv import KV_KINDS, KVChoice, model_bytes_per_token, parse_kv
# imported here so that loading the KV passes (recipe._load_pass_modules) registers rotate_v too
from .rotate_v import RotateV  # noqa: F401

# assign_kv v1 (flat KIVI fields) → v2 (one shorthand); kept so old recipes still load
_V1_FIELDS = ("kind", "bits", "k_bits", "v_bits", "group_size", "residual", "sink", "k_axis",
              "k_rotation", "dtype")


def _v1_shorthand(d: Mapping[str, Any]) -> str:
    kind = d.get("kind", "kivi")
    if kind == "dense":
        return {"float32": "dense", "bfloat16": "dense:bf16", "float16": "dense:fp16"}.get(
            d.get("dtype", "float32"), "dense")
    bits = d.get("bits", 4)
    k, v = d.get("k_bits") or bits, d.get("v_bits") or bits
    if d.get("dtype", "float32") != "float32":   # kivi's fp windows have no shorthand option
        raise ConfigError(f"assign_kv: a v1 kivi config with dtype {d['dtype']!r} has no "
                          "shorthand; its fp windows are float32 in v2 (write kv = \"kivi4...\")")
    opts = [f"kivi{k}"] + ([f"v{v}"] if v != k else [])
    opts += [f"g{d.get('group_size', 32)}", f"r{d.get('residual', 128)}"]
    if d.get("sink"):
        opts.append(f"s{d['sink']}")
    if d.get("k_axis", "channel") == "token":
        opts.append("kt")
    if d.get("k_rotation", "none") == "hadamard":
        opts.append("hk")
    return ":".join(opts)


@dataclass(frozen=True)
class AssignKVConfig(PassConfig):
    kv: str = "kivi4"                # a `--kv` shorthand without weight rewrites
    layers: tuple[int, ...] = ()     # layers to assign; empty = all
    skip_layers: tuple[int, ...] = ()  # layers left as they are (e.g. (0,) keeps layer 0 dense)
    version: int = 2

    def __post_init__(self):
        choice = self.choice()
        if choice.rewrites:
            raise ConfigError(f"assign_kv: '{self.kv}' also rewrites weights "
                              f"({', '.join(choice.rewrites)}); list that pass before assign_kv in "
                              "the recipe, or use kv_passes() for a shorthand")

    def choice(self) -> KVChoice:
        return parse_kv(self.kv)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "pass config"):
        d = dict(d)
        if "kv" not in d and any(k in d for k in _V1_FIELDS):      # v1 recipe
            legacy = {k: d.pop(k) for k in _V1_FIELDS if k in d}
            d["kv"] = _v1_shorthand(legacy)
            d.pop("version", None)
        return super().from_dict(d, where=where)


@register_pass
class AssignKV(Pass):
    name = "assign_kv"
    Config = AssignKVConfig
    version = 2
    exact = False
    stage = "kv"
    sets_kv = True      # the verifier runs it through real caches

    def run(self, gm, ctx) -> PassResult:
        spec = ir.get_spec(gm)
        cfg = self.config
        n = spec.n_layers
        for i in (*cfg.layers, *cfg.skip_layers):
            if not -n <= i < n:
                raise ConfigError(f"assign_kv: layer {i} out of range (model has {n} layers)")
        chosen = {i % n for i in cfg.layers} if cfg.layers else set(range(n))
        chosen -= {i % n for i in cfg.skip_layers}
        kv = cfg.choice().spec
        kind = KV_KINDS.get(kv.kind)
        if kind.reads_input:
            for i in sorted(chosen):
                check_input_is_kv_input(gm, i, kv.kind)

        before = model_bytes_per_token(spec)
        order = tuple(sorted(chosen))
        for i in order:   # LayerSpec validates kv against the layer; old kind state is dropped
            ir.set_layer_kv(gm, i, kind.for_layer(kv, spec, i, order))
        new = ir.get_spec(gm)
        fp16 = sum(2 * l.kv_dim * 2 for l in new.layers)
        after = model_bytes_per_token(new)
        stats = {"layers": list(order), "kv": kv.label(),
                 "kv_bytes_per_token_before": before, "kv_bytes_per_token_after": after,
                 "kv_ratio_vs_fp16": round(after / fp16, 4)}
        return PassResult(gm, stats)


class CalibratedKVPass(Pass):
    """Base of a kind's own calibrating pass (palu, think; `KVChoice.assign`): it computes each
    layer's KV params and state tensors from calibration activations and sets them with
    `ir.set_layer_kv`. Verified through the caches like assign_kv."""

    exact = False
    stage = "kv"
    sets_kv = True
    needs_calibration = True

    def require_ctx(self, ctx) -> None:
        if ctx is None:
            raise ConfigError(f"{self.name}: needs calibration text (run it through optimize, "
                              "or apply_kv_flag with the model's tokenizer)")


@dataclass(frozen=True)
class KVShorthandConfig(PassConfig):
    """The config of a calibrating KV pass: the `--kv` shorthand of the kind it sets (KIND)."""
    KIND: ClassVar[str] = ""
    kv: str = ""
    version: int = 1

    def __post_init__(self):
        if parse_kv(self.kv).spec.kind != self.KIND:
            raise ConfigError(f"{self.KIND} pass: kv '{self.kv}' is not a {self.KIND} shorthand")

    def params(self):
        return parse_kv(self.kv).spec.params


def attention_input_stats(gm, ctx, init: Callable, update: Callable) -> tuple[list, int]:
    """Per layer, statistics of what its attention node receives over the calibration windows,
    layer by layer (LayerwiseRunner: one layer's activations alive at a time): acc = init(layer
    spec), then update(acc, q, k, v) per batch with the post-RoPE q (B, Hq, T, D), k, v
    (B, Hkv, T, D). Returns (the accumulators, the number of calibration tokens)."""
    from ..compiler.calibrate import LayerwiseRunner
    runner = LayerwiseRunner(gm, ctx.calibration_batches())
    out, n = [], 0
    for i, ls in enumerate(ir.get_spec(gm).layers):
        attn = next(x for x in ir.nodes_by_role(gm, "attn") if x.meta["mcomp"].layer == i)
        acc, seen = init(ls), [0]

        def collect(node, args, _out, attn=attn, acc=acc, seen=seen):
            if node is attn:        # args = (q, k, v, h)
                update(acc, *args[:3])
                seen[0] += args[1].shape[0] * args[1].shape[2]
        runner.advance(i, collect)
        out.append(acc)
        n = seen[0]
    return out, n


def check_input_is_kv_input(gm, layer: int, kind: str) -> None:
    """A kind that stores the attention input h must get exactly what the layer's K/V
    projections read; otherwise what it rematerializes is not the layer's K/V."""
    attn = next(n for n in ir.nodes_by_role(gm, "attn") if n.meta["mcomp"].layer == layer)
    h = attn.args[3] if len(attn.args) > 3 else None
    srcs = {n.args[0] for n in gm.graph.nodes if n.op == "call_module"
            and n.meta["mcomp"].layer == layer
            and n.meta["mcomp"].role in ("k_proj", "v_proj", "qkv_proj")}
    if h is None or srcs != {h}:
        raise ConfigError(f"assign_kv: layer {layer}: a '{kind}' cache stores the attention "
                          "input, but the attention node's input is not what the layer's K/V "
                          "projections read")


def kv_passes(text: str) -> list[Pass]:
    """The passes a `--kv` shorthand stands for: its weight rewrites, then the pass that sets
    the kind (assign_kv, or the kind's own calibrating pass)."""
    from . import cskv, eigen, palu, think  # noqa: F401  the calibrating KV passes register on import
    choice = parse_kv(text)
    rewrites = [PASSES.get(name)() for name in choice.rewrites]
    assign = PASSES.get(choice.assign)
    return rewrites + [assign(assign.Config(kv=choice.text))]


def with_kv_passes(recipe, passes: list[Pass]):
    """The recipe with the `--kv` passes in it: assign_kv replaces the kv stage; a rotation pass
    replaces only a pass of its own name (other passes of its stage stay), in stage order."""
    for p in passes:
        if p.stage == "kv":
            recipe = recipe.replace_stage(p)
            continue
        kept = [q for q in recipe.passes if q.name != p.name]
        ordered = sorted(kept + [p], key=lambda q: STAGES.index(q.stage))   # stable
        recipe = dataclasses.replace(recipe, passes=tuple(ordered), name=f"{recipe.name}+{p.name}")
    return recipe


def kv_context(passes: list[Pass], text: str, tokenizer=None, calib_text: str | None = None):
    """The CompileContext the `--kv` passes need: None unless one of them calibrates (palu,
    think), then one over `calib_text` (default: the embedded calibration text)."""
    if not any(getattr(p, "needs_calibration", False) for p in passes):
        return None
    if tokenizer is None:
        raise ConfigError(f"--kv '{text}' calibrates on text: it needs the model's tokenizer")
    from .. import data
    from ..compiler.context import CompileContext
    return CompileContext.from_text(lambda t: tokenizer.encode(t, add_bos=False),
                                    calib_text or data.calibration_text(), bos_id=tokenizer.bos_id)


def apply_kv_flag(gm, text: str, tokenizer=None, calib_text: str | None = None) -> list[dict]:
    """Apply a `--kv` shorthand to an existing IR (any target; weight rewrites such as `:hv`
    need float weights) without a pass manager; returns each pass's stats. The one function
    eval, passkey and the benchmarks use. A calibrated kind (palu, think) calibrates on
    `calib_text` (default: the embedded calibration text) tokenized by `tokenizer`."""
    passes = kv_passes(text)
    ctx = kv_context(passes, text, tokenizer, calib_text)
    stats = []
    for p in passes:
        p.check(gm)
        stats.append(p.run(gm, ctx).stats)
    return stats
