"""The embedded calibration / evaluation text (see README.md in this folder)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..errors import ConfigError


def calibration_text() -> str:
    return files(__name__).joinpath("calib_prideprejudice.txt").read_text(encoding="utf-8")


def evaluation_text() -> str:
    return files(__name__).joinpath("eval_persuasion.txt").read_text(encoding="utf-8")


def read_text(path: str | Path) -> str:
    """A user-supplied text file; a clear ConfigError when it is missing, unreadable or empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"text file '{p}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read text file '{p}': {e}") from None
    if not text.strip():
        raise ConfigError(f"text file '{p}' is empty")
    return text
