"""Shared fixtures. Keep generic: other test modules add to this file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def save_hf(tmp_path):
    """save_hf(model, name="hf") → folder holding `model.save_pretrained(...)` (safetensors)."""

    def save(model: torch.nn.Module, name: str = "hf") -> Path:
        out = tmp_path / name
        model.save_pretrained(out)
        return out

    return save
