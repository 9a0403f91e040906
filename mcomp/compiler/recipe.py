"""Recipes: pipelines as data.

A recipe is a TOML file naming passes and their options, plus calibration and verification
settings. Named presets are recipes shipped in `mcomp/recipes/`. CLI shorthands
(`--weights rtn:4:g128`) build a pass and replace the recipe's pass of the same stage.

    name = "int4"
    description = "..."
    [calibration]            # optional: CalibrationConfig fields
    n_samples = 32
    [verify]                 # optional: VerifyConfig fields
    max_kld = 0.5
    [[pass]]
    name = "quantize_weights_rtn"
    bits = 4
    group_size = 128
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .context import CalibrationConfig
from .manager import VerifyConfig
from .passes import PASSES, STAGES, Pass


def _load_pass_modules() -> None:
    """Import every module that registers passes (registries fill on import)."""
    from .. import passes as _p  # noqa: F401
    from ..passes import assign_kv, cskv, eigen, fuse_gate_up, fuse_qkv, palu, rotate_v, think  # noqa: F401
    from ..quant import awq, gptq, hqq, mixed, rtn  # noqa: F401
    from ..prune import layers, structured  # noqa: F401


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[Pass, ...]
    description: str = ""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "calibration": self.calibration.to_dict(), "verify": self.verify.to_dict(),
                "passes": [p.describe() for p in self.passes]}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "Recipe":
        _load_pass_modules()
        known = {"name", "description", "calibration", "verify", "pass"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(known)}")
        passes = []
        for i, entry in enumerate(d.get("pass", [])):
            entry = dict(entry)
            if "name" not in entry:
                raise ConfigError(f"{where}: [[pass]] #{i + 1} has no name")
            passes.append(PASSES.get(entry.pop("name")).from_dict(entry))
        return cls(name=d.get("name", Path(where).stem), description=d.get("description", ""),
                   passes=_ordered(passes, where),
                   calibration=_sub(CalibrationConfig, d.get("calibration", {}), where, "calibration"),
                   verify=_sub(VerifyConfig, d.get("verify", {}), where, "verify"))

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"recipe file '{p}' does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"recipe '{p}' is not valid TOML: {e}") from None
        return cls.from_dict(data, str(p))

    @classmethod
    def preset(cls, name: str) -> "Recipe":
        names = preset_names()
        if name not in names:
            raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(names)}")
        text = files("mcomp.recipes").joinpath(f"{name}.toml").read_text(encoding="utf-8")
        return cls.from_dict(tomllib.loads(text), f"preset '{name}'")

    def replace_stage(self, new: Pass) -> "Recipe":
        """The recipe with every pass of `new`'s stage replaced by `new` (CLI shorthands)."""
        kept = [p for p in self.passes if p.stage != new.stage]
        return dataclasses.replace(self, passes=_ordered(kept + [new], self.name),
                                   name=f"{self.name}+{new.name}")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in files("mcomp.recipes").iterdir() if p.name.endswith(".toml"))


def _sub(cls, d: dict, where: str, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{where}: [{section}] unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**d)


def _ordered(passes: list[Pass], where: str) -> tuple[Pass, ...]:
    """Stable sort by stage; a pass's stage must be known."""
    for p in passes:
        if p.stage not in STAGES:
            raise ConfigError(f"{where}: pass '{p.name}' has unknown stage '{p.stage}'")
    return tuple(sorted(passes, key=lambda p: STAGES.index(p.stage)))


def parse_format(text: str, where: str) -> dict[str, int]:
    """`BITS[:gGROUP]` (group `g0` or `pc` = per channel) → {"bits", "group_size"}; the weight
    format grammar of `--weights` and of mixed-precision candidates."""
    parts = text.strip().split(":")
    if len(parts) not in (1, 2) or not parts[0].isdigit():
        raise ConfigError(f"{where}: expected BITS[:gGROUP], e.g. 4:g128")
    opts = {"bits": int(parts[0])}
    if len(parts) == 2:
        g = parts[1].lower()
        if g in ("pc", "g0"):
            opts["group_size"] = 0
        elif g.startswith("g") and g[1:].isdigit():
            opts["group_size"] = int(g[1:])
        else:
            raise ConfigError(f"{where}: group must look like g128 (or pc for per-channel)")
    elif opts["bits"] == 8:
        opts["group_size"] = 0  # int8 defaults to per-channel: that is what the fast kernel runs
    return opts


def _embedding_opts(token: str, linears: dict[str, int], where: str) -> dict[str, int]:
    """`emb` (the linears' format) or `embBITS[gGROUP|pc]` (`emb8` = per channel like a bare 8,
    `emb4` = the linears' group, `emb4g64`) → the quantizer config's embedding fields."""
    m = re.fullmatch(r"emb(\d*)(g\d+|pc)?", token.lower())
    if m is None:
        raise ConfigError(f"{where}: embedding option must look like emb, emb8 or emb4g128")
    if not m[1]:
        return {"embedding_bits": linears["bits"]}      # group: the linears' (config default)
    fmt = parse_format(m[1] + (f":{m[2]}" if m[2] else ""), where)
    out = {"embedding_bits": fmt["bits"]}
    if "group_size" in fmt:
        out["embedding_group_size"] = fmt["group_size"]
    return out


def parse_weights_flag(text: str) -> Pass:
    """`METHOD:BITS[:gGROUP][:emb[BITS[gGROUP]]]` (group `g0` or `pc` = per channel; the `emb`
    suffix also quantizes the token embedding, and with it a tied lm_head) → the quantizer pass."""
    from ..quant.scheme import QUANTIZERS
    _load_pass_modules()
    method, _, fmt = text.strip().partition(":")
    if not fmt or not fmt.split(":")[0].isdigit():
        raise ConfigError(f"--weights '{text}': expected METHOD:BITS[:gGROUP][:emb[BITS]], e.g. "
                          "rtn:4:g128 or rtn:4:g128:emb8 (a bare METHOD only goes with "
                          "--weight-budget or --weight-bits)")
    cls = QUANTIZERS.get(method)
    where = f"--weights '{text}'"
    fmt, sep, emb = fmt.partition(":emb")
    opts = parse_format(fmt, where)
    if sep:
        opts.update(_embedding_opts("emb" + emb, opts, where))
    return cls.from_dict(opts)


def parse_budget_flags(weights: str | None, weight_budget: str | int | None,
                       weight_bits: float | None) -> Pass:
    """`--weight-budget SIZE` (total weight bytes, e.g. 60MB) or `--weight-bits B` (average bits
    per quantized weight, scales/zeros counted), with `--weights METHOD[:embBITS[gGROUP]]`
    choosing the quantizer (and a fixed format for the token embedding, outside the plan) →
    the mixed-precision pass. `--weights METHOD:BITS` is a uniform plan and conflicts."""
    _load_pass_modules()
    from ..quant.mixed import MixedConfig, QuantizeWeightsMixed
    from ..units import parse_bytes
    if weight_budget is not None and weight_bits is not None:
        raise ConfigError("give --weight-budget or --weight-bits, not both")
    opts: dict[str, Any] = {}
    if weights:
        method, sep, rest = weights.strip().partition(":")
        if sep and not rest.lower().startswith("emb"):
            raise ConfigError(f"--weights '{weights}' is a uniform plan and conflicts with "
                              "--weight-budget/--weight-bits; give the bare method (e.g. --weights "
                              "hqq, or hqq:emb4 to quantize the embedding too) to choose the "
                              "quantizer of a mixed plan")
        opts["method"] = method.lower()
        if sep:   # the plan has no bit width of its own for a bare `emb` to copy
            if rest.lower() == "emb":
                raise ConfigError(f"--weights '{weights}': with a budget, give the embedding's "
                                  f"format, e.g. {method}:emb4 or {method}:emb8")
            opts["method_options"] = _embedding_opts(rest, {}, f"--weights '{weights}'")
    if weight_budget is not None:
        opts["budget_bytes"] = (weight_budget if isinstance(weight_budget, int)
                                else parse_bytes(weight_budget, "--weight-budget"))
    else:
        opts["avg_bits"] = float(weight_bits)
    return QuantizeWeightsMixed(MixedConfig.from_dict(opts, where="mixed-precision weights"))


def parse_prune_flag(text: str) -> Pass:
    """`METHOD:RATIO` (flap:0.2, wanda-sp:0.3, magnitude:0.2) or `METHOD:SIZE` (flap:400MB, the
    weight bytes to end at) → prune_structured; `layers:N` → prune_layers removing N blocks."""
    _load_pass_modules()
    from ..prune.importance import IMPORTANCE
    from ..units import is_size, parse_bytes
    parts = text.strip().split(":")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"--prune '{text}': expected METHOD:RATIO (e.g. flap:0.2), METHOD:SIZE "
                          f"(e.g. flap:400MB) or layers:N; methods: {', '.join(IMPORTANCE.names())}")
    method, value = parts[0].strip().lower(), parts[1].strip()
    if method == "layers":
        if not value.isdigit():
            raise ConfigError(f"--prune '{text}': layers:N needs a whole number of blocks")
        return PASSES.get("prune_layers").from_dict({"n_layers": int(value)})
    IMPORTANCE.get(method)
    if is_size(value):
        target = {"target_bytes": parse_bytes(value, f"--prune '{text}'")}
    else:
        try:
            target = {"ratio": float(value)}
        except ValueError:
            raise ConfigError(f"--prune '{text}': RATIO must be a number in (0, 1), e.g. 0.2, or "
                              "a size such as 400MB") from None
    return PASSES.get("prune_structured").from_dict({"method": method, **target})


def parse_kv_flag(text: str) -> list[Pass]:
    """`kivi2` (K/V 2-bit, group 32, residual 128), `kivi4`, `kivi8`, with optional `:gN :rN
    :sN :kt :hk :hv` (group, residual, sink, per-token keys, Hadamard key rotation, Hadamard V
    rotation folded into weights), or `dense` → [rotate_v (if :hv)], assign_kv. Merge them into
    a recipe with `passes.assign_kv.with_kv_passes`."""
    _load_pass_modules()
    from ..passes.assign_kv import kv_passes
    return kv_passes(text)
