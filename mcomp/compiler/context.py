"""CompileContext: calibration data and cached statistics flow through here, never through globals.

Calibration text is tokenized once into a token stream; batches are deterministic windows
(evenly spaced over the stream, BOS first), so a recipe run twice on the same text sees the
same data. The probe batch is a small fixed batch the verifier runs after every pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class CalibrationConfig:
    n_samples: int = 32      # windows of calibration text
    seq_len: int = 256       # tokens per window, BOS included
    probe_batch: int = 2     # verification probe: sequences ...
    probe_len: int = 64      # ... of this many tokens

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def windows(ids: torch.Tensor, n: int, seq_len: int, bos: int | None) -> torch.Tensor:
    """n windows of seq_len tokens (BOS + seq_len-1 text tokens), evenly spaced over `ids`."""
    body = seq_len - (1 if bos is not None else 0)
    if ids.numel() < body:
        raise ConfigError(f"calibration text too short: {ids.numel()} tokens, need at least {body}")
    n_fit = ids.numel() - body + 1
    starts = torch.linspace(0, n_fit - 1, steps=min(n, n_fit)).long()
    out = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos is not None:
        out = torch.cat([torch.full((out.shape[0], 1), bos, dtype=out.dtype), out], dim=1)
    return out


@dataclass
class CompileContext:
    calib_ids: torch.Tensor                 # 1-D token stream of calibration text
    probe_ids: torch.Tensor                 # (B, T) verification probe batch
    bos_id: int | None = None
    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    cache: dict = field(default_factory=dict)   # activation statistics, keyed by whoever computes them
    calib_source: str = "embedded"

    @classmethod
    def from_text(cls, encode, calib_text: str, probe_text: str | None = None, bos_id=None,
                  config: CalibrationConfig | None = None, calib_source: str = "embedded"):
        """`encode(text) -> list[int]` without BOS. The probe comes from `probe_text` (default: the
        end of the calibration text, so it is not one of the first calibration windows)."""
        config = config or CalibrationConfig()
        if not calib_text or not calib_text.strip():
            raise ConfigError("calibration text is empty")
        calib = torch.tensor(encode(calib_text), dtype=torch.long)
        probe_src = torch.tensor(encode(probe_text), dtype=torch.long) if probe_text else calib.flip(0)
        probe = windows(probe_src if probe_text else calib, config.probe_batch, config.probe_len, bos_id)
        return cls(calib_ids=calib, probe_ids=probe, bos_id=bos_id, config=config,
                   calib_source=calib_source)

    def calibration_batches(self, batch_size: int = 8) -> Iterator[torch.Tensor]:
        """Deterministic (b, seq_len) batches of calibration windows."""
        w = windows(self.calib_ids, self.config.n_samples, self.config.seq_len, self.bos_id)
        yield from w.split(batch_size)

    @staticmethod
    def positions(ids: torch.Tensor) -> torch.Tensor:
        return torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
