"""mcomp: a model-compression compiler for transformer language models.

Public API: `optimize` (import → verified passes → artifact), `load` (a runnable Session over
an artifact or a model), `inspect` (per-layer structure and sizes), `Recipe`, and the errors.
"""
__version__ = "0.1.0"

from .api import CompileResult, inspect, load, optimize  # noqa: E402
from .compiler.recipe import Recipe  # noqa: E402
from .errors import (ArtifactError, ConfigError, KernelUnavailable, MCompError,  # noqa: E402
                     ModelImportError, PassError)

__all__ = ["optimize", "load", "inspect", "Recipe", "CompileResult", "MCompError", "ConfigError",
           "ModelImportError", "ArtifactError", "PassError", "KernelUnavailable", "__version__"]
