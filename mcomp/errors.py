"""Error hierarchy. The CLI maps each family to an exit code and a one-line message.

exit 2: ConfigError (usage, recipes, impossible budgets, missing input files)
exit 3: ModelImportError / ArtifactError (what the user handed us is unusable)
exit 4: PassError / KernelUnavailable / anything else (our fault or the environment's)
"""
from __future__ import annotations


class MCompError(Exception):
    """Base class of every error mcomp raises on purpose."""

    exit_code = 4


class ConfigError(MCompError):
    """Bad recipe, flag, budget, or a missing input file."""

    exit_code = 2


class ModelImportError(MCompError):
    """A model source that cannot be imported (unknown architecture, unreadable files)."""

    exit_code = 3


class ArtifactError(MCompError):
    """An artifact that is truncated, tampered with, foreign or from another format version."""

    exit_code = 3


class PassError(MCompError):
    """A pass failed or broke the IR. The message names the pass, the passes before it and the node."""

    exit_code = 4

    def __init__(self, message: str, *, pass_name: str | None = None,
                 previous: tuple[str, ...] = (), node: str | None = None):
        parts = [message]
        if pass_name is not None:
            parts.insert(0, f"pass '{pass_name}'")
        if node is not None:
            parts.append(f"at node '{node}'")
        if pass_name is not None:
            parts.append(f"(after: {', '.join(previous) if previous else 'nothing'})")
        super().__init__(" ".join(parts) if pass_name else message)
        self.pass_name = pass_name
        self.previous = previous
        self.node = node


class KernelUnavailable(MCompError):
    """No kernel can execute a stored format on this machine."""

    exit_code = 4


class ExportError(MCompError):
    """The model holds something the chosen export target cannot express (a KV representation
    onnxruntime has no kernel for, a weight format its ops refuse). Names the representation
    and what can be exported instead."""

    exit_code = 2
