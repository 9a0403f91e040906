"""Pass base class, configs and registry.

A pass is a small class in its own file: a `name`, a frozen versioned `Config`, whether it is
`exact` (verification then holds it to a tight numerical tolerance), preconditions in
`check`, and `run(gm, ctx) -> PassResult`. Passes register themselves in PASSES; recipes and
the CLI build pipelines by name from there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from torch import fx

from ..errors import ConfigError
from ..registry import Registry

PASSES: Registry = Registry("pass")

# Canonical order of pipeline stages: structure first (pruning), then exact rewrites that must
# see float weights (rotations, fusions), then weight quantization, then KV representation.
STAGES = ("prune", "transform", "fuse", "weights", "kv")


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: frozen, serializable, validated on construction."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "pass config"):
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; valid: {sorted(names)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None


@dataclass
class PassResult:
    gm: fx.GraphModule
    stats: dict = field(default_factory=dict)


class Pass:
    name: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    version: ClassVar[int] = 1
    exact: ClassVar[bool] = False
    # Pipeline stage; recipes keep passes in STAGES order and CLI shorthands replace a stage.
    stage: ClassVar[str] = "transform"

    def __init__(self, config: PassConfig | None = None):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise ConfigError(f"pass '{self.name}' takes a {self.Config.__name__}, "
                              f"got {type(self.config).__name__}")

    def check(self, gm: fx.GraphModule) -> None:
        """Raise PassError if the IR does not meet this pass's preconditions."""

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        raise NotImplementedError

    def describe(self) -> dict:
        """What goes into the manifest's pass log."""
        return {"pass": self.name, "version": self.version, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Pass":
        return cls(cls.Config.from_dict(d, where=f"pass '{cls.name}'"))


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    PASSES.register(cls.name, cls)
    return cls
