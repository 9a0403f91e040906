"""End-to-end decode speed at long context: one model, dense fp32 KV cache vs quantized KV caches.

`mcomp bench decode --ctx 8192 --kv kivi2 --kv kivi4`. The weights are the same for every row
(`--preset`, fp32 by default: the KV cache is the only difference). Each row runs in its own
spawned process, one after the other, with the same thread count, so peak RSS is its own and
timings do not overlap. Per row:

- prefill `ctx − steps − 1` tokens of the embedded evaluation text (Persuasion) in chunks of
  `prefill_chunk` tokens (untimed: the KIVI cache attends chunks in full precision and stores
  them quantized, as the runtime does);
- one untimed decode step: it builds (or loads) the JIT-compiled decode kernels, which a fresh
  machine compiles on first use (~30 s each; that once counted in the timed steps);
- then `steps` greedy single-token decode steps through the cache, timed as a whole, so the
  last step attends over exactly `ctx` tokens; tokens/s = steps / time;
- the KV cache's exact bytes after the last step (`AttentionState.nbytes`), peak RSS.

Decode at long context reads every layer's cache once per token; a dense fp32 cache at 8k
tokens is 30 × 8192 × 2 × 192 × 4 B = 377 MB per step for SmolLM2, about as much as its fp32
weights, so this is where a 2-bit cache read directly by the kernel should show up.
"""
from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import run_isolated


@dataclass(frozen=True)
class DecodeBenchConfig:
    model: str = "smollm2-135m"
    preset: str = "fp32"
    kv: tuple[str, ...] = ("kivi2",)
    ctx: int = 8192
    steps: int = 32
    threads: int = 2
    prefill_chunk: int = 1024
    repeats: int = 1

    def rows(self) -> tuple[str, ...]:
        """The dense baseline first, then each KV scheme once."""
        return ("dense",) + tuple(k for k in self.kv if k != "dense")


def _child(kv: str, artifact: str, ids: list[int], cfg: DecodeBenchConfig, q) -> None:
    try:
        from mcomp.codegen import load_artifact
        from mcomp.compiler import ir
        from mcomp.runtime.kvcache import AttentionState
        from mcomp.bench.runtime import _peak_rss as peak_rss_bytes
        torch.set_num_threads(cfg.threads)
        art = load_artifact(artifact)
        gm = art.gm
        if kv != "dense":
            from mcomp.passes.assign_kv import apply_kv_flag
            from mcomp.runtime.tokenizer import Tokenizer
            tok = (None if art.tokenizer_dir is None
                   else Tokenizer.from_dir(art.tokenizer_dir, ir.get_spec(gm)))
            apply_kv_flag(gm, kv, tok)
        spec = ir.get_spec(gm)
        prompt = torch.tensor(ids[: cfg.ctx - cfg.steps - 1])[None]
        times = []
        for _ in range(cfg.repeats):
            state = AttentionState(spec, 1, model=gm)
            state.reserve(cfg.ctx + 1)                      # prompt + timed steps: no regrowth
            state.last_logits_only = True
            with torch.inference_mode():
                n = 0
                for a in range(0, prompt.shape[1], cfg.prefill_chunk):
                    chunk = prompt[:, a:a + cfg.prefill_chunk]
                    pos = torch.arange(n, n + chunk.shape[1])[None]
                    state.begin(pos)
                    logits = gm(chunk, pos, state)
                    n += chunk.shape[1]
                nxt = logits[:, -1:].argmax(-1)
                # warm-up step (untimed): JIT kernels built or loaded, buffers allocated
                pos = torch.tensor([[n]])
                state.begin(pos)
                nxt = gm(nxt, pos, state)[:, -1:].argmax(-1)
                n += 1
                t0 = time.perf_counter()
                for _ in range(cfg.steps):
                    pos = torch.tensor([[n]])
                    state.begin(pos)
                    nxt = gm(nxt, pos, state)[:, -1:].argmax(-1)
                    n += 1
                times.append(time.perf_counter() - t0)
        paths = sorted({getattr(c, "last_path", None) or "dense" for c in state.caches})
        from mcomp.runtime.kv import decode_cost
        costs = [decode_cost(l, n) for l in spec.layers]
        q.put({"kv": kv, "label": spec.layers[0].kv.label(), "threads": torch.get_num_threads(),
               "context": n, "decode_tok_s": cfg.steps / statistics.median(times),
               "ms_per_token": 1e3 * statistics.median(times) / cfg.steps,
               "kv_cache_bytes": state.nbytes(), "weight_bytes": ir.weight_bytes(gm),
               "attention_path": ",".join(paths), "peak_rss_bytes": peak_rss_bytes(),
               "model_kv_read_bytes": sum(c.bytes_read for c in costs),
               "model_kv_flops": sum(c.flops for c in costs),
               "machine": _machine_rates() if kv == "dense" else None})
    except BaseException as e:  # report to the parent instead of dying silently
        q.put({"kv": kv, "error": f"{type(e).__name__}: {e}"})


def _machine_rates() -> dict:
    """This process's copy bandwidth and fp32 GEMM rate at its thread count: the two constants
    the cost model's step-time prediction needs (measured, not assumed)."""
    x = torch.empty(64 * 2 ** 20)                                       # 256 MB
    y = torch.empty_like(x)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        ts.append(time.perf_counter() - t0)
    bw = 2 * x.numel() * 4 / min(ts)                                    # read + write
    a = torch.randn(1024, 1024)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        ts.append(time.perf_counter() - t0)
    return {"copy_bytes_per_s": bw, "gemm_flops_per_s": 2 * 1024 ** 3 / min(ts)}


def predicted_step_s(row: dict, machine: dict) -> float:
    """Roofline-style step time from the cost model: every weight and the cache bytes the kinds
    say a step reads, at copy bandwidth, plus the weights' and the kinds' FLOPs at GEMM rate."""
    bw, fl = machine["copy_bytes_per_s"], machine["gemm_flops_per_s"]
    weight_flops = 2 * row["weight_bytes"] / 4                          # fp32 weights: 2 per param
    return ((row["weight_bytes"] + row["model_kv_read_bytes"]) / bw
            + (weight_flops + row["model_kv_flops"]) / fl)


def run(cfg: DecodeBenchConfig = DecodeBenchConfig(), progress=None) -> dict:
    from mcomp import api, data
    from mcomp.errors import ConfigError
    if cfg.steps + 1 >= cfg.ctx:
        raise ConfigError("--steps must be smaller than --ctx - 1 (one untimed warm-up step)")
    from mcomp.passes.assign_kv import kv_passes
    for kv in cfg.rows():
        kv_passes(kv)          # a bad --kv is a one-line ConfigError now, not after compiling
    tmp = Path(tempfile.mkdtemp(prefix="mcomp-bench-decode-"))
    try:
        if progress:
            progress(f"compiling {cfg.model} ({cfg.preset})")
        api.optimize(cfg.model, cfg.preset, out=tmp / "model")
        session = api.load(tmp / "model")
        ids = session._require_tokenizer().encode(data.evaluation_text())
        if len(ids) < cfg.ctx:
            raise ConfigError(f"--ctx {cfg.ctx} exceeds the {len(ids)} tokens of evaluation text")
        del session
        rows = []
        for kv in cfg.rows():
            if progress:
                progress(f"{kv}: prefill {cfg.ctx - cfg.steps} tokens, decode {cfg.steps}")
            rows.append(run_isolated(_child, (kv, str(tmp / "model"), ids, cfg), f"decode {kv}"))
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]
    machine = base.get("machine")
    for r in rows:
        r["speedup_vs_dense"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["kv_bytes_vs_dense"] = r["kv_cache_bytes"] / base["kv_cache_bytes"]
        if machine and "error" not in r:
            # the cost model predicts what the KV representation changes in a step; the rest of
            # the step (weights, per-op dispatch: identical in every row) is the dense row's
            # measured time. A pure roofline of the whole step is 6x too optimistic for this
            # Python-driven runtime, which made its ratios meaningless.
            dense_s = base["ms_per_token"] / 1e3
            r["predicted_step_ratio_vs_dense"] = (
                dense_s + predicted_step_s(r, machine) - predicted_step_s(base, machine)) / dense_s
            r["measured_step_ratio_vs_dense"] = r["ms_per_token"] / base["ms_per_token"]
    return {"model": cfg.model, "preset": cfg.preset, "ctx": cfg.ctx, "steps": cfg.steps,
            "threads": cfg.threads, "prefill_chunk": cfg.prefill_chunk, "repeats": cfg.repeats,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "rows": rows}


def section(res: dict) -> str:
    """docs/benchmarks.md section name: one per weight preset."""
    return "kv-decode" if res["preset"] == "fp32" else f"kv-decode-{res['preset']}"


def to_markdown(res: dict) -> str:
    lines = [
        f"## End-to-end decode at {res['ctx']} tokens of context: dense vs quantized KV cache "
        f"({res['preset']} weights)",
        "",
        f"`mcomp bench decode --model {res['model']} --preset {res['preset']} --ctx {res['ctx']} "
        + " ".join(f"--kv {r['kv']}" for r in res["rows"][1:])
        + f" --threads {res['threads']}` — weights `{res['preset']}` in every row; "
        f"{res['threads']} threads; prefill {res['ctx'] - res['steps'] - 1} tokens of Persuasion "
        f"(untimed, chunks of {res['prefill_chunk']}) and one untimed warm-up decode step, then "
        f"{res['steps']} greedy decode steps "
        f"timed together (the last attends over {res['ctx']} tokens); each row in its own "
        f"process; torch {res['torch']}.",
        "",
        "| KV cache | decode tok/s | ms/token | vs dense | KV cache MB | vs dense | weights + KV MB "
        "| bytes-bound estimate | step time vs dense: cost model / measured | peak RSS MB | attention |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base = res["rows"][0]
    read0 = base["weight_bytes"] + base["kv_cache_bytes"]
    for r in res["rows"]:
        read = r["weight_bytes"] + r["kv_cache_bytes"]
        lines.append(f"| {r['label']} | {r['decode_tok_s']:.2f} | {r['ms_per_token']:.1f} | "
                     f"{r['speedup_vs_dense']:.2f}× | {r['kv_cache_bytes'] / 1e6:.1f} | "
                     f"{r['kv_bytes_vs_dense']:.3f}× | {read / 1e6:.0f} | {read0 / read:.2f}× | "
                     f"{r.get('predicted_step_ratio_vs_dense', float('nan')):.2f} / "
                     f"{r.get('measured_step_ratio_vs_dense', float('nan')):.2f} | "
                     f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['attention_path']} |")
    lines += ["", "Each decode step reads every weight and every layer's cache once; \"bytes-bound "
              "estimate\" is the speedup if a step cost only those bytes (dense weights + KV over "
              "this row's weights + KV), to read the measured one against. The weights are the "
              "same in every row, so the smaller they are (`--preset int4`), the larger the "
              "share of the step the cache decides. \"Cost model\" is the step-time ratio the "
              "KV kinds' cost entries predict: the dense row's measured step time plus the "
              "difference in the kinds' bytes read (at this machine's measured copy bandwidth) "
              "and FLOPs (at its measured fp32 GEMM rate), over the dense row's step time; "
              "beside it the measured ratio."]
    return "\n".join(lines) + f"\n\n```json\n{json.dumps(res, indent=1)}\n```"
