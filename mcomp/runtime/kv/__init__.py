"""KV representations: the registry of kinds and the interface every kind implements.

A KV representation ("kind") is one file in this package. It registers a `KVKind` in `KV_KINDS`
and owns everything about itself:

- `Params`: a frozen, versioned dataclass (`KVParams`) with its own validation, `label`,
  per-layer checks and `to_dict`/`from_dict` (the version is checked; older versions migrate
  through the class's `migrate`);
- `parse(arg, options)`: its `--kv` shorthand (`kivi2:g32:s4`, `dense:bf16`, ...);
- `bytes_held(params, layer, n)`: the exact bytes a cache of this layer holds after n tokens
  streamed in (payload + scales/metadata + fp windows), and `bytes_per_token`, the amortized cost
  of one more token at long context;
- `cost(params, layer, context)`: bytes read and FLOPs of one decode step over `context` tokens;
- `cache(layer, batch, binding)`: the runtime container (a `KVCache`), with its pure-torch
  reference attention and, where built, a fast kernel;
- `verify_steps(params)`: how many decode steps verification must run to see the kind's lossy
  state (for KIVI: past the fp residual window, two groups deep);
- `state_shapes(params, layer)`: the calibrated per-layer tensors the kind owns (Palu's factors,
  ThinK's kept channels), by name → (shape, dtype). The canonical Block holds them in its
  `kv_state` module (compiler/model.py: KVState), so they are part of the state dict, the
  artifact and its checks like any weight, and a cache reads them through `binding.state()`.
  Such a kind is set by its own calibrating pass (`KVChoice.assign`), never by plain assign_kv.

Nothing else in mcomp names a kind: `KVSpec = {kind, params}` (compiler/spec.py) resolves its
params class here, the CLI lists kinds from here, `parse_kv` turns any `--kv` text into a spec
plus the weight rewrites it needs, and AttentionState builds caches from here. Adding a kind is
its file, its test and one import line at the bottom of this file.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from ...errors import ConfigError
from ...registry import Registry

if TYPE_CHECKING:
    from ...compiler.spec import KVSpec, LayerSpec, ModelSpec
    from ..kvcache import KVBinding, KVCache


@dataclass(frozen=True)
class KVParams:
    """Base of a kind's parameters. Subclasses are frozen dataclasses whose `__post_init__`
    validates what can be checked without a layer; `check_layer` does the rest."""

    VERSION: ClassVar[int] = 1

    def label(self) -> str:
        raise NotImplementedError

    def check_layer(self, layer: "LayerSpec") -> None:
        """Constraints that need the layer (head_dim, KV heads); raise ConfigError."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["version"] = self.VERSION
        return d

    @classmethod
    def migrate(cls, d: dict, version: int) -> dict:
        """Turn a params dict of an older `version` into the current layout (default: unchanged)."""
        return d

    @classmethod
    def from_legacy(cls, flat: Mapping[str, Any]) -> "KVParams":
        """The flat KV record of format-1/2 manifests (`kind` plus the params' fields, and
        fields other kinds used, which are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in flat.items() if k in names})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "kv params") -> "KVParams":
        d = dict(d)
        v = d.pop("version", cls.VERSION)
        if type(v) is not int or v < 1:
            raise ConfigError(f"{where}: invalid params version {v!r}")
        if v > cls.VERSION:
            raise ConfigError(f"{where}: params version {v} is newer than this mcomp reads "
                              f"({cls.VERSION}); upgrade mcomp")
        if v < cls.VERSION:
            d = cls.migrate(d, v)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class KVCost:
    """One decode step of one layer over `context` cached tokens (batch 1)."""

    bytes_read: float      # cache bytes the attention reads (+ any factors it needs)
    flops: float           # multiply-adds × 2, attention and rematerialization included

    def to_dict(self) -> dict:
        return {"bytes_read": self.bytes_read, "flops": self.flops}


@dataclass(frozen=True)
class KVChoice:
    """What a `--kv` text stands for: the spec, the weight rewrites (pass names, in order) that
    must run before it (e.g. `rotate_v` for KIVI's `:hv`), and `text`, the shorthand of the spec
    alone (the options that stand for rewrites removed): what assign_kv's config records."""

    spec: "KVSpec"
    text: str
    rewrites: tuple[str, ...] = ()
    #: the pass that sets the kind (config: `kv=text`): assign_kv, or a kind's calibrating pass
    #: that also computes its per-layer params and state tensors (palu, think)
    assign: str = "assign_kv"


class KVKind:
    """Interface of a KV representation (see the module docstring). Instances are stateless."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[KVParams]] = KVParams
    #: one line for `--kv` help: the shorthand and its options
    syntax: ClassVar[str] = ""
    #: AttentionState must pass the model's binding (projections, RoPE) to build this cache
    needs_binding: ClassVar[bool] = False
    #: the cache can be filled from another cache's K/V (`KVCache.load`; passkey shares a prefill)
    loads_kv: ClassVar[bool] = True
    #: the cache stores (a function of) the attention input h: assign_kv checks that h is what
    #: the layer's K/V projections read
    reads_input: ClassVar[bool] = False

    def parse(self, arg: str, options: list[str], text: str) -> KVChoice:
        raise NotImplementedError

    def cache(self, layer: "LayerSpec", batch: int, binding: "KVBinding | None") -> "KVCache":
        raise NotImplementedError

    def bytes_held(self, params: KVParams, layer: "LayerSpec", n_tokens: int) -> int:
        raise NotImplementedError

    def bytes_per_token(self, params: KVParams, layer: "LayerSpec") -> float:
        """Amortized bytes of one more token at long context (fp windows excluded)."""
        raise NotImplementedError

    def cost(self, params: KVParams, layer: "LayerSpec", context: int) -> KVCost:
        raise NotImplementedError

    def for_layer(self, spec: "KVSpec", model: "ModelSpec", layer: int,
                  chosen: "tuple[int, ...]") -> "KVSpec":
        """The spec layer `layer` of `model` gets when `spec` is assigned to the layers `chosen`
        (sorted): the same spec for most kinds; a cross-layer kind marks which layers anchor."""
        return spec

    def verify_steps(self, params: KVParams) -> int:
        return 4

    def lossless(self, params: KVParams) -> bool:
        return False

    def state_shapes(self, params: KVParams, layer: "LayerSpec",
                     hidden: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name → (shape, dtype name) of the per-layer tensors this kind owns (default none);
        `hidden` is the width of the attention input."""
        return {}


KV_KINDS: Registry[KVKind] = Registry("KV representation")


def window_split(n_tokens: int, sink: int, residual: int, group: int) -> tuple[int, int, int]:
    """(sink, quantized store, fp residual) token counts of a streaming cache after n tokens
    (KIVI's schedule, shared by every kind that uses it): the first `sink` tokens stay fp, and
    the fp window is flushed `group` tokens at a time once it holds ≥ residual + group."""
    ns = min(sink, n_tokens)
    rest = n_tokens - ns
    nq = max(0, (rest - residual) // group) * group
    return ns, nq, rest - nq


def exact_number(x) -> int | float:
    """A Fraction of bytes as an int when whole, else a float."""
    return int(x) if x.denominator == 1 else float(x)


def register_kind(cls: type[KVKind]) -> type[KVKind]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    KV_KINDS.register(cls.name, cls())
    return cls


def kind_of(spec: "KVSpec") -> KVKind:
    return KV_KINDS.get(spec.kind)


def bytes_per_token(layer: "LayerSpec") -> float:
    """Amortized KV bytes of one more token in `layer` (its kind's accounting)."""
    return kind_of(layer.kv).bytes_per_token(layer.kv.params, layer)


def bytes_held(layer: "LayerSpec", n_tokens: int) -> int:
    """Exact bytes `layer`'s cache holds after n tokens streamed in (no eviction)."""
    return kind_of(layer.kv).bytes_held(layer.kv.params, layer, n_tokens)


def decode_cost(layer: "LayerSpec", context: int) -> KVCost:
    """Bytes read and FLOPs of one decode step of `layer` over `context` cached tokens."""
    return kind_of(layer.kv).cost(layer.kv.params, layer, context)


def state_shapes(layer: "LayerSpec", hidden: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The per-layer tensors `layer`'s KV kind owns (empty for most kinds)."""
    return kind_of(layer.kv).state_shapes(layer.kv.params, layer, hidden)


def model_bytes_per_token(spec) -> float:
    return sum(bytes_per_token(l) for l in spec.layers)


_HEAD = re.compile(r"^([a-z][a-z-]*?)(\d*)$")


def shorthand_help() -> str:
    """The registered kinds' shorthands, for CLI help."""
    return "; ".join(KV_KINDS.get(n).syntax for n in KV_KINDS.names())


def parse_kv(text: str) -> KVChoice:
    """Any `--kv` text → KVChoice. The head names a registered kind, optionally with a number
    glued on (`kivi2`); options follow after colons and belong to the kind."""
    parts = [p.strip().lower() for p in str(text).strip().split(":")]
    if not parts or not parts[0]:
        raise ConfigError(f"--kv: empty value; expected one of: {shorthand_help()}")
    if any(not p for p in parts[1:]):
        raise ConfigError(f"--kv '{text}': empty option")
    m = _HEAD.match(parts[0])
    if m is None or m.group(1) not in KV_KINDS:
        raise ConfigError(f"--kv '{text}': unknown KV representation '{parts[0]}'; registered: "
                          f"{shorthand_help()}")
    kind = KV_KINDS.get(m.group(1))
    try:
        return kind.parse(m.group(2), parts[1:], text)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("--kv") else f"--kv '{text}': {msg}") from None


# the kinds (one import line each)
from . import dense  # noqa: E402,F401
from . import kivi  # noqa: E402,F401
from . import xquant  # noqa: E402,F401
from . import xquant_cl  # noqa: E402,F401
from . import palu  # noqa: E402,F401
from . import think  # noqa: E402,F401
from . import eigen  # noqa: E402,F401
from . import cskv  # noqa: E402,F401
