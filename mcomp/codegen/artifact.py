"""Write and read mcomp artifacts: a directory with manifest.json, model.safetensors and the
source model's tokenizer files. No pickle anywhere.

Writing is atomic: everything is built and fsync'ed in a temporary directory next to the
target (same filesystem), then renamed into place; an existing artifact is renamed away first
and removed only after the new one is in place. On any failure the temporary directory is
removed and whatever was at the target is left as it was. A non-empty directory that is not an
mcomp artifact is never overwritten.

Reading verifies before it uses any tensor: manifest format and version, the manifest's own
digest, size and sha256 of every listed file, and that the tensors the model spec implies, the
tensors the manifest lists and the tensors the safetensors header holds agree by name, dtype
and shape. Every failure is an ArtifactError with a one-line message naming the file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import fx

from ..compiler import ir
from ..compiler.frontend.base import TOKENIZER_FILES
from ..compiler.spec import ModelSpec
from ..errors import ArtifactError, ConfigError, MCompError
from ..quant.embedding import EMBED, HEAD, head_is_tied, tie_head
from .emit import (ARTIFACT, EmitContext, check_target, extra_emitters, fsync, options_json,
                   sha256, staged)
from .manifest import (DIGEST_KEY, EMBED_FORMAT_VERSION, FORMAT, FORMAT_VERSION, MANIFEST_NAME,
                       ST_DTYPES, SUPPORTED_FORMAT_VERSIONS, WEIGHTS_NAME, TensorInfo,
                       build_skeleton, compare_tensors, describe_linears, dtype_name,
                       format_version_for, implied_tensors, jsonable, manifest_digest, migrate,
                       module_bytes, safetensors_metadata, stored_state)

log = logging.getLogger("mcomp.codegen")

_MAX_HEADER = 100 << 20          # safetensors' own limit on the JSON header
def _mcomp_version() -> str:
    try:
        import mcomp
        return str(getattr(mcomp, "__version__", "0.1.0"))
    except Exception:  # a partially importable package must not block writing
        return "0.1.0"


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _fail(msg: str) -> ArtifactError:
    return ArtifactError(_one_line(msg))


# ----------------------------------------------------------------------------- save

def _check_target(out: Path, overwrite: bool) -> None:
    check_target(out, overwrite, MANIFEST_NAME, FORMAT, "artifact")


def _tensors_to_write(gm: fx.GraphModule, spec: ModelSpec, out: Path) -> tuple[dict, dict]:
    """(weight table with bytes, name → contiguous CPU tensor), checked against the spec."""
    weights = describe_linears(gm, spec)
    expected = implied_tensors(spec, weights, where=f"cannot write {out}: model")
    sd = stored_state(gm, spec)
    if spec.tie_embeddings and not head_is_tied(gm):
        raise _fail(f"cannot write {out}: the model spec says tie_embeddings but lm_head does not "
                    "share the embedding's tensors (a pass changed the head without untying the spec)")
    actual = {k: TensorInfo(dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()}
    diff = compare_tensors(expected, actual, expected_what="the model spec", actual_what="the model")
    if diff:
        raise _fail(f"cannot write {out}: {diff}")
    for name, entry in weights.items():
        entry["bytes"] = module_bytes(expected, name)
        if name == HEAD and spec.tie_embeddings:
            entry["tied_to"] = EMBED
    tensors, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share storage: give each its own exact buffer
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    return weights, tensors


def _pass_log(report, pass_log) -> list:
    """Pass log entries: the explicit list if given, else the report's pass records (with stats)."""
    if pass_log is not None:
        return [p.describe() if hasattr(p, "describe") else p for p in pass_log]
    return [{"pass": rec.name, "version": rec.version, "config": rec.config,
             "exact": rec.exact, "stats": rec.stats,
             **({"kv_drift": rec.kv_drift} if getattr(rec, "kv_drift", None) else {})}
            for rec in getattr(report, "passes", None) or []]


def _write_manifest(path: Path, manifest: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _build(tmp: Path, gm: fx.GraphModule, spec: ModelSpec, weights: dict, tensors: dict,
           tok_files: list[str], tokenizer_dir: Path | None, source: str, report, pass_log, recipe,
           emitters, ectx: EmitContext) -> None:
    version = format_version_for(weights)
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=safetensors_metadata(version))
    for name in tok_files:
        shutil.copyfile(tokenizer_dir / name, tmp / name)
    emitted = []
    for e in emitters:      # other targets' files next to the artifact, listed and verified with it
        emitted += e.write(gm, tmp, ectx)
    files = {}
    for name in [WEIGHTS_NAME, *tok_files, *emitted]:
        p = tmp / name
        fsync(p)
        files[name] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    log_entries = _pass_log(report, pass_log)
    report_dict = None
    if report is not None:
        report_dict = report.to_dict() if hasattr(report, "to_dict") else report
    manifest = jsonable({
        "format": FORMAT,
        "format_version": version,
        "mcomp_version": _mcomp_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "model": spec.to_dict(),
        "weights": weights,
        "tensors": {k: TensorInfo(dtype_name(v.dtype), tuple(v.shape)).to_dict()
                    for k, v in tensors.items()},
        "pass_log": log_entries,
        "recipe": recipe,
        "report": report_dict,
        "tokenizer": {"files": tok_files},
        "emitted": options_json({e.name: ectx.options.get(e.name) for e in emitters}),
        "files": files,
    })
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    _write_manifest(tmp / MANIFEST_NAME, manifest)        # staged() fsyncs the folder


def save_artifact(gm: fx.GraphModule, out_dir: str | os.PathLike, *,
                  tokenizer_dir: str | os.PathLike | None, source: str, report=None,
                  pass_log=None, recipe: Mapping | None = None, overwrite: bool = True,
                  emit: Sequence[str] = (ARTIFACT,), emit_options: Mapping | None = None) -> Path:
    """Write `gm` as an artifact at `out_dir` atomically; returns the artifact's path.

    `report`: a compiler Report (or its dict); `pass_log`: a list of `Pass.describe()`-like
    dicts (or Pass objects), default: the report's pass records; `recipe`: the resolved recipe
    (`Recipe.to_dict()`), stored so the artifact says exactly how it was made. `emit`: other
    registered emitters (codegen/emit.py, e.g. "onnx") whose files are written into the same
    directory, listed in the manifest and committed with the artifact in one rename;
    `emit_options`: emitter name → its options.
    """
    out = Path(out_dir).expanduser().resolve()
    spec = ir.get_spec(gm)
    _check_target(out, overwrite)
    tok_dir = None if tokenizer_dir is None else Path(tokenizer_dir)
    if tok_dir is not None and not tok_dir.is_dir():
        raise ConfigError(f"tokenizer directory {tok_dir} does not exist")
    tok_files = [] if tok_dir is None else [n for n in TOKENIZER_FILES if (tok_dir / n).is_file()]
    weights, tensors = _tensors_to_write(gm, spec, out)
    emitters = extra_emitters(emit)
    ectx = EmitContext(source=str(source), tokenizer_dir=tok_dir, options=dict(emit_options or {}))
    for e in emitters:                       # refusals before anything is written
        e.check(gm, ectx)
    with staged(out, "artifact") as tmp:
        _build(tmp, gm, spec, weights, tensors, tok_files, tok_dir, source, report, pass_log, recipe,
               emitters, ectx)
    log.info("wrote artifact %s (%d tensors, %d tokenizer files)", out, len(tensors), len(tok_files))
    return out


# ----------------------------------------------------------------------------- verify / load

@dataclass
class LoadedArtifact:
    gm: fx.GraphModule
    manifest: dict
    path: Path
    tokenizer_dir: Path | None    # the artifact directory when it carries tokenizer files


@dataclass
class _Checked:
    root: Path
    manifest: dict
    spec: ModelSpec
    weights: dict


def _read_manifest(root: Path) -> dict:
    if not root.exists():
        raise _fail(f"{root}: no such file or directory")
    if not root.is_dir():
        raise _fail(f"{root}: not an mcomp artifact (a file; an artifact is a directory holding "
                    f"{MANIFEST_NAME})")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise _fail(f"{root}: not an mcomp artifact (no {MANIFEST_NAME})")
    try:
        m = json.loads(mpath.read_bytes())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _fail(f"{mpath}: not an mcomp artifact (unreadable JSON: {e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise _fail(f"{mpath}: not an mcomp artifact (format {fmt!r}, expected '{FORMAT}')")
    v = m.get("format_version")
    if type(v) is not int or v not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(str(s) for s in SUPPORTED_FORMAT_VERSIONS)
        hint = ("; upgrade mcomp to read it" if type(v) is int and v > FORMAT_VERSION
                else "; re-export the model with this mcomp")
        raise _fail(f"{mpath}: artifact format version {v!r} is not supported by this mcomp "
                    f"(it reads version {supported}){hint}")
    stored = m.get(DIGEST_KEY)
    try:
        actual = manifest_digest(m)
    except ValueError:  # NaN / Infinity literals cannot be canonicalized
        actual = None
    if not isinstance(stored, str) or stored != actual:
        raise _fail(f"{mpath} was modified after it was written "
                    f"({DIGEST_KEY} does not match its contents)")
    return m


def _field(m: dict, key: str, typ: type, mpath: Path):
    v = m.get(key)
    if not isinstance(v, typ):
        raise _fail(f"{mpath}: key '{key}' is missing or not a{'n' if typ is dict else ''} "
                    f"{'object' if typ is dict else 'list'}")
    return v


def _safe_name(name: Any, mpath: Path) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..", MANIFEST_NAME)
            or "/" in name or "\\" in name or "\0" in name):
        raise _fail(f"{mpath}: invalid file name {name!r} in 'files'")
    return name


def _check_files(root: Path, files: dict, mpath: Path) -> None:
    entries = []
    for name, e in files.items():
        name = _safe_name(name, mpath)
        if (not isinstance(e, dict) or not isinstance(e.get("sha256"), str)
                or type(e.get("bytes")) is not int):
            raise _fail(f"{mpath}: entry for '{name}' in 'files' needs 'sha256' and 'bytes'")
        entries.append((root / name, e["bytes"], e["sha256"]))
    for p, size, _ in entries:  # cheap checks for every file before hashing any
        if not p.is_file():
            raise _fail(f"{p}: missing (listed in {MANIFEST_NAME})")
        have = p.stat().st_size
        if have < size:
            raise _fail(f"{p} is truncated: {have} of {size} bytes")
        if have > size:
            raise _fail(f"{p} has {have} bytes, {MANIFEST_NAME} lists {size} (the file was modified)")
    for p, _, sha in entries:
        got = sha256(p)
        if got != sha:
            raise _fail(f"{p}: sha256 mismatch, the file is corrupted or was modified "
                        f"(got {got[:16]}…, {MANIFEST_NAME} lists {sha[:16]}…)")


def _manifest_tensors(table: dict, mpath: Path) -> dict[str, TensorInfo]:
    out = {}
    for name, e in table.items():
        ok = (isinstance(e, dict) and e.get("dtype") in ST_DTYPES.values()
              and isinstance(e.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in e["shape"]))
        if not ok:
            raise _fail(f"{mpath}: tensor '{name}' has an invalid entry {e!r}")
        out[name] = TensorInfo(e["dtype"], tuple(e["shape"]))
    return out


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and sanity-check a safetensors header without reading any tensor data:
    (name → TensorInfo, str→str metadata)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _fail(f"{path}: too short to be a safetensors file ({size} bytes)")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise _fail(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _fail(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise _fail(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, e in header.items():
        try:
            dtype = ST_DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _fail(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        info = TensorInfo(dtype, shape)
        if not (0 <= begin <= end <= data_len) or end - begin != info.nbytes:
            raise _fail(f"{path}: tensor '{name}' has data offsets [{begin}, {end}) that do not fit "
                        f"its {dtype} {list(shape)} in {data_len} data bytes")
        tensors[name] = info
    return tensors, meta if isinstance(meta, dict) else {}


def _check(path: str | os.PathLike) -> _Checked:
    root = Path(path).expanduser()
    mpath = root / MANIFEST_NAME
    m = migrate(_read_manifest(root), str(mpath))     # older format versions: explicit migration
    model_d = _field(m, "model", dict, mpath)
    weights = _field(m, "weights", dict, mpath)
    tensors_d = _field(m, "tensors", dict, mpath)
    files = _field(m, "files", dict, mpath)
    tok = _field(m, "tokenizer", dict, mpath)
    tok_files = tok.get("files")
    if not isinstance(tok_files, list):
        raise _fail(f"{mpath}: key 'tokenizer.files' is missing or not a list")
    if WEIGHTS_NAME not in files:
        raise _fail(f"{mpath}: '{WEIGHTS_NAME}' is not listed in 'files'")
    unlisted = [n for n in tok_files if n not in files]
    if unlisted:
        raise _fail(f"{mpath}: tokenizer file {unlisted[0]!r} is not listed in 'files'")
    try:
        spec = ModelSpec.from_dict(model_d)
    except (ConfigError, TypeError, ValueError, AttributeError) as e:
        raise _fail(f"{mpath}: invalid model spec: {e}") from None
    if EMBED in weights and m["format_version"] < EMBED_FORMAT_VERSION:
        raise _fail(f"{mpath}: weights '{EMBED}' needs format version {EMBED_FORMAT_VERSION}, "
                    f"the manifest says {m['format_version']}")

    _check_files(root, files, mpath)

    listed = _manifest_tensors(tensors_d, mpath)
    try:
        implied = implied_tensors(spec, weights, where=f"{mpath}: weights")
    except ConfigError as e:  # the spec names something this mcomp cannot build
        raise _fail(f"{mpath}: model spec cannot be built: {e}") from None
    diff = compare_tensors(implied, listed, expected_what="the model spec",
                           actual_what=f"{MANIFEST_NAME} 'tensors'")
    if diff:
        raise _fail(f"{mpath}: {diff}")
    for name, entry in weights.items():
        want = module_bytes(implied, name)
        if entry.get("bytes") != want:
            raise _fail(f"{mpath}: weights '{name}' lists {entry.get('bytes')} bytes, its tensors "
                        f"hold {want}")
    wpath = root / WEIGHTS_NAME
    header, meta = read_safetensors_header(wpath)
    if meta.get("format") != FORMAT:
        raise _fail(f"{wpath}: not written by mcomp (metadata format {meta.get('format')!r})")
    diff = compare_tensors(listed, header, expected_what=MANIFEST_NAME,
                           actual_what="the safetensors header")
    if diff:
        raise _fail(f"{wpath}: {diff}")
    return _Checked(root, m, spec, weights)


def verify_artifact(path: str | os.PathLike) -> dict:
    """Run every integrity check of `load_artifact` without building the model; returns the
    manifest. Raises ArtifactError (one line, naming the file) on the first problem."""
    return _check(path).manifest


def load_artifact(path: str | os.PathLike) -> LoadedArtifact:
    """Verify, then build the traced IR (CausalLM from the stored spec, QuantLinear where the
    manifest says quantized, QuantEmbedding for a quantized embedding with a tied head sharing
    its tensors, strict state-dict load)."""
    c = _check(path)
    wpath = c.root / WEIGHTS_NAME
    try:
        # meta skeleton + assign: no random-initialized fp32 copy is ever allocated
        model = build_skeleton(c.spec, c.weights, where=str(c.root / MANIFEST_NAME), device="meta")
        sd = load_file(str(wpath))
    except MCompError:
        raise
    except Exception as e:  # safetensors' own parse errors, allocation failures
        raise _fail(f"{wpath}: cannot be read: {type(e).__name__}: {e}") from None
    if c.spec.tie_embeddings:  # the head's tensors are the embedding's (embed.weight or qweight/…)
        for k in [k for k in sd if k.startswith(EMBED + ".")]:
            sd[HEAD + k[len(EMBED):]] = sd[k]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise _fail(f"{wpath}: does not fit the model spec: {e}") from None
    if c.spec.tie_embeddings:
        tie_head(model)  # assign=True gave each module its own reference; share one table again
    model.init_derived_buffers().eval()
    gm = ir.trace(model)
    gm.eval()
    tok_dir = c.root if c.manifest["tokenizer"]["files"] else None
    return LoadedArtifact(gm=gm, manifest=c.manifest, path=c.root, tokenizer_dir=tok_dir)
