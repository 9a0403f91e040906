"""Emitters: writers of a compiled model, registered by name (`safetensors`, `onnx`).

An emitter checks the model first (`check`: a representation its target cannot express is a
one-line ExportError before any byte is written) and then writes its files into a directory
the caller commits atomically (`write` → the names it wrote). Two callers:

- `save_artifact(..., emit=("onnx",))` (codegen/artifact.py): the mcomp artifact is the
  `safetensors` emitter; every other emitter writes next to it in the same temporary directory,
  and the manifest lists (and load verifies) their files too. `mcomp optimize --emit
  safetensors,onnx` → one folder that mcomp's runtime, onnxruntime and onnxruntime-genai load.
- `write_export(...)`: a folder of emitters' files without the mcomp artifact (`mcomp export
  ARTIFACT --format onnx`, `--emit onnx` alone), marked by `mcomp_export.json` with the
  sha256 of every file, so that re-exporting into it is allowed and into anything else is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from torch import fx

from ..compiler.frontend.base import TOKENIZER_FILES
from ..errors import ArtifactError, ConfigError
from ..registry import Registry

log = logging.getLogger("mcomp.codegen")

EXPORT_MARKER = "mcomp_export.json"
EXPORT_FORMAT = "mcomp-export"
EXPORT_VERSION = 1
ARTIFACT = "safetensors"        # the emitter that is the mcomp artifact itself


@dataclass(frozen=True)
class EmitContext:
    source: str = ""
    tokenizer_dir: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)   # emitter name → its options


class Emitter(Protocol):
    name: str

    def check(self, gm: fx.GraphModule, ctx: EmitContext) -> None: ...

    def write(self, gm: fx.GraphModule, tmp: Path, ctx: EmitContext) -> list[str]: ...


EMITTERS: Registry[Emitter] = Registry("emitter")


def parse_emit(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'safetensors,onnx' → ('safetensors', 'onnx'), every name checked against the registry."""
    if text is None:
        return (ARTIFACT,)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--emit needs at least one format; choose from: " + ", ".join(formats()))
    for n in names:
        if n not in formats():
            raise ConfigError(f"unknown emitter '{n}'; choose one of: {', '.join(formats())}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--emit {','.join(names)}: a format is listed twice")
    return tuple(names)


def formats() -> list[str]:
    """Every format `--emit` takes: the mcomp artifact and the registered emitters."""
    return [ARTIFACT, *EMITTERS.names()]


def options_json(options: Mapping[str, Any]) -> dict:
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in options.items()}


def extra_emitters(names: Sequence[str]) -> list[Emitter]:
    return [EMITTERS.get(n) for n in names if n != ARTIFACT]


# ----------------------------------------------------------------------------- file helpers

def sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    """fsync a file or (where the OS allows it) a directory."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_rename = os.rename              # indirection so tests can fail the swap


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is renamed away first and restored on failure."""
    if not (out.exists() or out.is_symlink()):
        _rename(tmp, out)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()  # only the unique name is wanted
        _rename(out, old)
        try:
            _rename(tmp, out)
        except BaseException:
            _rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            log.warning("could not remove the previous output at %s", old)
    fsync(out.parent)


def holds(path: Path, marker: str, fmt: str) -> bool:
    """Whether `path` has the JSON `marker` file of an mcomp folder of format `fmt`."""
    try:
        m = json.loads((path / marker).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == fmt


def check_target(out: Path, overwrite: bool, marker: str, fmt: str, what: str) -> None:
    """Refuse to replace anything but a missing or empty folder or an earlier mcomp `what`
    (recognised by its marker file), and that one only with overwrite: user data is never
    swapped away by a write."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; refusing to replace it")
    if not any(out.iterdir()):
        return
    if not holds(out, marker, fmt):
        raise ArtifactError(f"{out} is a non-empty directory that is not an mcomp {what} (no "
                            f"{marker} with format '{fmt}'); refusing to overwrite it, choose a "
                            "new or empty directory")
    if not overwrite:
        raise ArtifactError(f"{out} already holds an mcomp {what}; pass overwrite=True to replace it")


def check_export_target(out: Path, overwrite: bool) -> None:
    check_target(out, overwrite, EXPORT_MARKER, EXPORT_FORMAT, "export")


@contextlib.contextmanager
def staged(out: Path, what: str):
    """A temporary folder next to `out` to write into; on success it replaces `out` in one
    rename (swap_into_place), on any failure it is removed and `out` is untouched. OSErrors
    become one-line ArtifactErrors naming `what`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ArtifactError(f"cannot write {what} {out}: {e}") from e
    try:
        yield tmp
        fsync(tmp)
        swap_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ArtifactError(f"cannot write {what} {out}: {e}") from e
        raise


def write_export(gm: fx.GraphModule, out_dir: str | os.PathLike, formats: Sequence[str], *,
                 ctx: EmitContext, overwrite: bool = True) -> Path:
    """Write the emitters `formats` (no mcomp artifact) into `out_dir` atomically, with the
    tokenizer files and the export marker."""
    emitters = extra_emitters(formats)
    if not emitters:
        raise ConfigError("write_export needs a format other than the mcomp artifact")
    for e in emitters:                       # refusals before anything is written
        e.check(gm, ctx)
    out = Path(out_dir).expanduser().resolve()
    check_export_target(out, overwrite)
    with staged(out, "export") as tmp:
        names: list[str] = []
        for e in emitters:
            names += e.write(gm, tmp, ctx)
        tok = ctx.tokenizer_dir
        for n in TOKENIZER_FILES:
            if tok is not None and (tok / n).is_file() and n not in names:
                shutil.copyfile(tok / n, tmp / n)
                names.append(n)
        files = {}
        for n in names:
            fsync(tmp / n)
            files[n] = {"sha256": sha256(tmp / n), "bytes": (tmp / n).stat().st_size}
        marker = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "formats": list(formats),
                  "source": ctx.source,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "options": options_json(ctx.options), "files": files}
        with open(tmp / EXPORT_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    log.info("wrote %s export %s (%d files)", ",".join(formats), out, len(files))
    return out
