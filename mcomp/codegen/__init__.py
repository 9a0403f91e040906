"""Codegen: the artifact writer/reader (manifest + safetensors + tokenizer files) and the
emitters that write other targets (ONNX) from the same graph."""
from .artifact import LoadedArtifact, load_artifact, save_artifact, verify_artifact  # noqa: F401
from . import onnx as _onnx  # noqa: F401  (registers the onnx emitter)
from .emit import EMITTERS, parse_emit, write_export  # noqa: F401
from .manifest import FORMAT, FORMAT_VERSION, implied_tensors  # noqa: F401

__all__ = ["save_artifact", "load_artifact", "verify_artifact", "LoadedArtifact", "FORMAT",
           "FORMAT_VERSION", "implied_tensors", "EMITTERS", "parse_emit", "write_export"]
