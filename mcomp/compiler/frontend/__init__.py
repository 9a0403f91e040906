"""Frontends: one module per architecture family. Importing this package registers them all."""
from . import gemma3, gpt2, llama, qwen  # noqa: F401  (registers)
from .base import (BUILTIN_MODELS, DEFAULT_MODEL, FRONTENDS, Frontend, ImportedModel,  # noqa: F401
                   import_model, resolve_hf_dir)
