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
    from ..passes import assign_kv, fuse_gate_up, fuse_qkv  # noqa: F401
    from ..quant import awq, gptq, hqq, rtn  # noqa: F401
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


def parse_weights_flag(text: str) -> Pass:
    """`METHOD:BITS[:gGROUP]` (group `g0` or `pc` = per channel) → the quantizer pass."""
    from ..quant.scheme import QUANTIZERS
    _load_pass_modules()
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise ConfigError(f"--weights '{text}': expected METHOD:BITS[:gGROUP], e.g. rtn:4:g128")
    cls = QUANTIZERS.get(parts[0])
    opts: dict[str, Any] = {"bits": int(parts[1])}
    if len(parts) == 3:
        g = parts[2].lower()
        if g in ("pc", "g0"):
            opts["group_size"] = 0
        elif g.startswith("g") and g[1:].isdigit():
            opts["group_size"] = int(g[1:])
        else:
            raise ConfigError(f"--weights '{text}': group must look like g128 (or pc for per-channel)")
    elif opts["bits"] == 8:
        opts["group_size"] = 0  # int8 defaults to per-channel: that is what the fast kernel runs
    return cls.from_dict(opts)


def parse_prune_flag(text: str) -> Pass:
    """`METHOD:RATIO` (flap:0.2, wanda-sp:0.3, magnitude:0.2) → prune_structured;
    `layers:N` → prune_layers removing N blocks."""
    _load_pass_modules()
    from ..prune.importance import IMPORTANCE
    parts = text.strip().split(":")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"--prune '{text}': expected METHOD:RATIO (e.g. flap:0.2) or layers:N; "
                          f"methods: {', '.join(IMPORTANCE.names())}")
    method, value = parts[0].strip().lower(), parts[1].strip()
    if method == "layers":
        if not value.isdigit():
            raise ConfigError(f"--prune '{text}': layers:N needs a whole number of blocks")
        return PASSES.get("prune_layers").from_dict({"n_layers": int(value)})
    try:
        ratio = float(value)
    except ValueError:
        raise ConfigError(f"--prune '{text}': RATIO must be a number in (0, 1), e.g. 0.2") from None
    IMPORTANCE.get(method)
    return PASSES.get("prune_structured").from_dict({"method": method, "ratio": ratio})


def parse_kv_flag(text: str) -> Pass:
    """`kivi2` (K/V 2-bit, group 32, residual 128), `kivi4`, `kivi8`, with optional `:gN :rN
    :sN :kt` (group, residual, sink, per-token keys), or `dense` → the assign_kv pass."""
    _load_pass_modules()
    from ..passes.assign_kv import AssignKV, kv_shorthand
    return AssignKV(kv_shorthand(text))
