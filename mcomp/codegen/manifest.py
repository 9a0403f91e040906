"""Artifact manifest schema: constants, canonical JSON and its digest, and the one function that
says which tensors a model spec plus a weight table imply.

The manifest is the artifact's table of contents. Loading trusts nothing in it until its own
digest (`manifest_sha256`, over the canonical JSON of every other key) matches, and trusts no
tensor until the tensors the spec implies, the tensors the manifest lists and the tensors the
safetensors header holds are the same set with the same dtypes and shapes.

`implied_tensors` is shared by save (to fill `manifest["tensors"]` and to check the model about
to be written) and load (to check a manifest before any tensor is read), so both sides agree
by construction.

Format versions: 1 describes every linear in `weights` (the token embedding is always a float
`embed.weight`); 2 adds a `weights["embed"]` entry for a quantized token embedding (stored like
a quantized linear: `embed.qweight/scales/zeros`; a tied lm_head is then a quantized entry with
`tied_to: "embed"` and no tensors of its own). The writer stamps the lowest version that
describes the artifact (`format_version_for`), so artifacts without a quantized embedding stay
version 1 and older mcomp releases keep reading them.

Version 3 stores every KV fact once: `model.layers[i].kv` is `{kind, params}` (params versioned
by its kind, runtime/kv/), and the redundant top-level `kv` view of versions 1-2 is gone. Every
artifact this mcomp writes is version 3 (a KV record older readers would misread is not theirs
to read). Versions 1 and 2 load through `migrate` (their flat KV record becomes `{kind,
params}` through the kind's own legacy reader) after their digest was checked as written.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..compiler import ir
from ..compiler.model import CausalLM
from ..compiler.spec import ModelSpec
from ..errors import ArtifactError, ConfigError
from ..quant.embedding import EMBED, HEAD, QuantEmbedding
from ..quant.linear import QuantLinear
from ..quant.scheme import WeightScheme

FORMAT = "mcomp-artifact"
FORMAT_VERSION = 3                  # the version this mcomp writes
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
KV_FORMAT_VERSION = 3               # first version with KVSpec = {kind, params} stored once
EMBED_FORMAT_VERSION = 2            # first version with a quantized embedding (weights["embed"])
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
DIGEST_KEY = "manifest_sha256"


def format_version_for(weights: Mapping[str, Any]) -> int:
    """The format version this mcomp writes (every artifact: the KV record changed in 3)."""
    return FORMAT_VERSION


def _legacy_kv(flat: Mapping[str, Any], where: str) -> dict:
    """A format-1/2 layer KV record (flat: kind plus its fields) → {kind, params}, read by the
    kind's own legacy reader."""
    from ..runtime.kv import KV_KINDS
    kind = flat.get("kind", "dense")
    if kind not in KV_KINDS:
        raise ArtifactError(f"{where}: unknown KV kind {kind!r} in a format-2 manifest")
    try:
        params = KV_KINDS.get(kind).Params.from_legacy(flat)
    except ConfigError as e:
        raise ArtifactError(f"{where}: invalid format-2 KV record: {e}") from None
    return {"kind": kind, "params": params.to_dict()}


def migrate(manifest: dict, where: str) -> dict:
    """A verified manifest of an older format version → the current layout (a copy). Explicit
    per version, so what changed is written down once: 1→2 added only optional keys; 2→3 moved
    the KV record into {kind, params} and dropped the redundant `kv` view."""
    m = dict(manifest)
    v = m["format_version"]
    if v < KV_FORMAT_VERSION:
        model = dict(m.get("model") or {})
        layers = []
        for i, layer in enumerate(model.get("layers") or []):
            layer = dict(layer)
            if isinstance(layer.get("kv"), dict) and "params" not in layer["kv"]:
                layer["kv"] = _legacy_kv(layer["kv"], f"{where}: layer {i}")
            layers.append(layer)
        model["layers"] = layers
        if model.get("version", 1) == 1:
            model["version"] = 2
        m["model"] = model
        m.pop("kv", None)
        m["migrated_from"] = v
    return m


def safetensors_metadata(version: int) -> dict[str, str]:
    return {"format": FORMAT, "format_version": str(version)}

WEIGHT_KINDS = ("float", "quantized")

# safetensors header dtype codes ↔ torch dtype names (the manifest uses the torch names)
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
             "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_itemsize(name: str) -> int:
    return getattr(torch, name).itemsize


# ----------------------------------------------------------------------------- JSON

def jsonable(obj: Any) -> Any:
    """A JSON-safe copy that survives dump → load → dump unchanged (so the digest is stable):
    str keys, lists for tuples, plain numbers, non-finite floats as strings."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return jsonable(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in items]
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if hasattr(obj, "item"):  # numpy scalars
        return jsonable(obj.item())
    return str(obj)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("utf-8")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its own digest key."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(canonical_json(body)).hexdigest()


# ----------------------------------------------------------------------------- weights

def weight_entry(mod: nn.Module) -> dict:
    """kind / shape / scheme of one float or quantized linear, or of a quantized embedding
    (shape [vocab, hidden], its (out, in) as a linear); bytes are filled in later."""
    out_f, in_f = ir.linear_shape(mod)
    if isinstance(mod, QuantLinear):
        return {"kind": "quantized", "shape": [out_f, in_f], "scheme": mod.scheme.to_dict()}
    if isinstance(mod, nn.Linear):
        return {"kind": "float", "shape": [out_f, in_f], "scheme": None}
    raise ArtifactError(f"cannot describe linear of type {type(mod).__name__}; "
                        "codegen knows nn.Linear and QuantLinear")


def describe_linears(model: nn.Module, spec: ModelSpec) -> dict[str, dict]:
    """Weight table entries (without bytes) for every linear the spec says the model has, plus
    `embed` when the token embedding is quantized (a float embedding has no entry: that is the
    version-1 table, and it keeps float-embedding artifacts readable by older releases)."""
    table = {}
    for name in ir.expected_linear_shapes(spec):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"model has no module '{name}' although its spec implies one") from None
        table[name] = weight_entry(mod)
    embed = model.get_submodule(EMBED)
    if isinstance(embed, QuantEmbedding):
        table[EMBED] = weight_entry(embed)
    return table


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_itemsize(self.dtype)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


def _entry_scheme(name: str, entry: Any, shape: tuple[int, int], where: str) -> WeightScheme | None:
    """Validate one weight-table entry against the (out, in) the spec implies: its scheme, or
    None for a float entry."""
    if not isinstance(entry, Mapping):
        raise ArtifactError(f"{where}: entry for '{name}' is not an object")
    kind, got = entry.get("kind"), entry.get("shape")
    if kind not in WEIGHT_KINDS:
        raise ArtifactError(f"{where}: '{name}' has kind {kind!r}; valid: {', '.join(WEIGHT_KINDS)}")
    if list(got or ()) != list(shape):
        raise ArtifactError(f"{where}: '{name}' has shape {got}, the model spec implies {list(shape)}")
    if kind == "float":
        if entry.get("scheme") is not None:
            raise ArtifactError(f"{where}: float weight '{name}' carries a scheme")
        return None
    try:
        return WeightScheme.from_dict(dict(entry.get("scheme") or {}))
    except (ConfigError, TypeError) as e:
        raise ArtifactError(f"{where}: '{name}' has an invalid scheme: {e}") from None


def _label(scheme: WeightScheme | None) -> str:
    return "float" if scheme is None else scheme.label()


def build_skeleton(spec: ModelSpec, weights: Mapping[str, Mapping[str, Any]], *,
                   where: str = "weights", device: str | torch.device = "meta") -> CausalLM:
    """CausalLM(spec) with the linears `weights` marks quantized replaced by QuantLinear, and the
    token embedding by a QuantEmbedding when `weights["embed"]` says so (absent: float).

    Checks the weight table against the spec on the way: same linear names, same shapes,
    valid kinds and schemes; a tied lm_head has exactly the embedding's kind and scheme and is
    built sharing its tensors. On "meta" nothing is allocated.
    """
    expected = ir.expected_linear_shapes(spec)
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected and n != EMBED]
    if missing:
        raise ArtifactError(f"{where}: no entry for linear '{missing[0]}' that the model spec implies")
    if extra:
        raise ArtifactError(f"{where}: linear '{extra[0]}' is not part of the model spec")
    V, H = spec.vocab_size, spec.hidden_size
    with torch.device(device):
        model = CausalLM(spec)
        embed_scheme = None
        if EMBED in weights:
            embed_scheme = _entry_scheme(EMBED, weights[EMBED], (V, H), where)
            if embed_scheme is not None:
                ir.replace_module(model, EMBED, QuantEmbedding(H, V, embed_scheme))
        for name, (out_f, in_f) in expected.items():
            scheme = _entry_scheme(name, weights[name], (out_f, in_f), where)
            if name == HEAD and spec.tie_embeddings:
                if scheme != embed_scheme:
                    raise ArtifactError(f"{where}: lm_head is tied to the embedding but is stored as "
                                        f"{_label(scheme)}, the embedding as {_label(embed_scheme)}")
                if scheme is not None:
                    ir.replace_module(model, name, model.get_submodule(EMBED).tied_head())
                continue
            if scheme is None:
                continue
            old = model.get_submodule(name)
            ir.replace_module(model, name, QuantLinear(in_f, out_f, scheme, bias=old.bias is not None))
    return model


def stored_state(model: nn.Module, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The persistent tensors an artifact stores: the state dict minus a tied lm_head (its
    tensors are the embedding's: `lm_head.weight`, or `lm_head.qweight/scales/zeros`)."""
    sd = model.state_dict()
    if spec.tie_embeddings:
        for k in [k for k in sd if k.startswith(HEAD + ".")]:
            del sd[k]
    return sd


def implied_tensors(spec: ModelSpec, weights: Mapping[str, Mapping[str, Any]], *,
                    where: str = "weights") -> dict[str, TensorInfo]:
    """Name → (dtype, shape) of every tensor model.safetensors must hold for this spec and weight
    table. Built on the meta device: no memory, the same module code the loader instantiates."""
    skeleton = build_skeleton(spec, weights, where=where, device="meta")
    return {k: TensorInfo(dtype_name(t.dtype), tuple(t.shape))
            for k, t in stored_state(skeleton, spec).items()}


def module_bytes(tensors: Mapping[str, TensorInfo], module: str) -> int:
    """Stored bytes of one module's tensors (0 for a tied lm_head: it is the embedding)."""
    prefix = module + "."
    return sum(t.nbytes for k, t in tensors.items() if k.startswith(prefix))


def compare_tensors(expected: Mapping[str, TensorInfo], actual: Mapping[str, TensorInfo], *,
                    expected_what: str, actual_what: str) -> str | None:
    """First difference between two tensor tables as one line, or None when they are equal."""
    for name in expected:
        if name not in actual:
            return f"tensor '{name}' implied by {expected_what} is missing from {actual_what}"
    for name in actual:
        if name not in expected:
            return f"tensor '{name}' in {actual_what} is not implied by {expected_what}"
    for name, e in expected.items():
        a = actual[name]
        if e.dtype != a.dtype:
            return f"tensor '{name}' is {a.dtype} in {actual_what}, {expected_what} implies {e.dtype}"
        if tuple(e.shape) != tuple(a.shape):
            return (f"tensor '{name}' has shape {list(a.shape)} in {actual_what}, "
                    f"{expected_what} implies {list(e.shape)}")
    return None
