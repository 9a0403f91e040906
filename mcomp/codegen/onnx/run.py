"""Run an exported decoder in onnxruntime through its past/present KV interface: the parity
tests' and benchmarks' view of an export (onnxruntime-genai drives the same interface)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import ConfigError


class OrtDecoder:
    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort
        p = Path(path)
        model = p / "model.onnx" if p.is_dir() else p
        if not model.is_file():
            raise ConfigError(f"{path}: no model.onnx")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        # (B, Hkv_i, past, D): mcomp's exports give each layer's KV heads and head size as
        # concrete dims; other exporters (the genai builder) may leave them symbolic, and then
        # the folder's genai_config.json says
        cfg = p / "genai_config.json" if p.is_dir() else p.parent / "genai_config.json"
        dec = json.loads(cfg.read_text())["model"]["decoder"] if cfg.is_file() else {}
        self.past = {}
        for i in self.session.get_inputs():
            if i.name.startswith("past_key_values."):
                h, d = i.shape[1], i.shape[3]
                self.past[i.name] = (h if isinstance(h, int) else dec.get("num_key_value_heads"),
                                     d if isinstance(d, int) else dec.get("head_size"))
                if None in self.past[i.name]:
                    raise ConfigError(f"{path}: past KV input {i.name} has symbolic dims "
                                      f"{i.shape} and no genai_config.json to resolve them")

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, h, 0, d), np.float32) for n, (h, d) in self.past.items()}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray]):
        """ids (B, S) → logits (B, S, V) and the present KV (named as the next step's past)."""
        held = next(iter(past.values())).shape[2] if past else 0
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((ids.shape[0], held + ids.shape[1]), np.int64), **past}
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        present = {n: out[n.replace("past_key_values.", "present.")] for n in past}
        return out["logits"], present

    def logits(self, ids: Sequence[int], prefill: int | None = None) -> np.ndarray:
        """(T, V) logits of `ids`: one prefill of the first `prefill` tokens (all of them by
        default), then one decode step per remaining token through the KV cache."""
        ids = np.asarray(ids, np.int64)[None]
        n = ids.shape[1] if prefill is None else prefill
        lg, past = self.step(ids[:, :n], self.empty_past())
        rows = [lg[0]]
        for t in range(n, ids.shape[1]):
            lg, past = self.step(ids[:, t:t + 1], past)
            rows.append(lg[0])
        return np.concatenate(rows, 0)
