"""Same-run anchors: mcomp's runtime vs llama.cpp (through llama-cpp-python) on the same checkpoint,
threads and token streams.

The checkpoints: mcomp compiles the built-in model (whose fp32 weights are the GGUF's, dequantized)
to its int4 presets; llama.cpp runs the very GGUF the model ships (SmolLM2: Q4_1, Gemma 3: Q4_K_M)
and that file requantized to Q4_0 by llama.cpp's own `llama_model_quantize` (so both sides start
from the same weights). Each configuration runs in its own spawned process (its own peak RSS);
rounds alternate the configurations (ABCD ABCD ...) so drift on a shared machine hits all of them
alike, and each figure is the median over rounds. Measured per configuration:

  - prefill tok/s: one forward over a fresh `prefill` -token prompt (time to first token);
  - decode tok/s at each context: prefill the context (untimed), one warm-up step, then `steps`
    greedy steps timed together (argmax of the last logits, as a generation loop does);
  - peak RSS (VmHWM) of the process;
  - bandwidth-bound fraction: (bytes a step must read ÷ measured copy bandwidth) ÷ measured step
    time. Bytes read = the weights (a tied table is read once, as the head) + the KV cache at that
    context; 1.0 would mean the step ran at memory speed.

mcomp decodes through the path `mcomp run` uses (runtime/fastdecode.py where it applies; the
`path` column says which ran). llama.cpp: llama-cpp-python's `Llama.eval`, flash attention on,
f16 KV unless a row says otherwise; logits read in place (no copy). llama-cpp-python is a benchmark
extra built from source (see docs/benchmarks.md for the exact build flags).
"""
from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import run_isolated
from .runtime import _peak_rss, _tokens


@dataclass(frozen=True)
class AnchorConfig:
    model: str = "smollm2-135m"
    threads: int = 2
    contexts: tuple[int, ...] = (128, 2048)
    prefill: int = 512
    steps: int = 32
    rounds: int = 3
    mcomp_weights: tuple[str, ...] = ("int4", "rtn:4:g128:emb8")
    llama_quants: tuple[str, ...] = ("Q4_0", "shipped")
    llama_kv: tuple[str, ...] = ("f16",)
    extra: dict = field(default_factory=dict)


_KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}          # ggml_type values
# Engine.prof slots (csrc/decode_step.cpp), in order
ENGINE_PHASES = ("norms, RoPE, residuals", "q|k|v", "attention", "o", "gate|up + act", "down", "head")


def copy_bandwidth(threads: int, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a large fp32 copy (read + write counted), best of `repeats`."""
    torch.set_num_threads(threads)
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


# ----------------------------------------------------------------------------- children

def _time_decode(prefill_fn, step_fn, ids, steps: int) -> float:
    prefill_fn(ids)
    step_fn()                                    # warm-up step (allocations, growth)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return steps / (time.perf_counter() - t0)


def _mcomp_child(name: str, artifact: str, cfg: AnchorConfig, q) -> None:
    try:
        torch.set_num_threads(cfg.threads)
        from mcomp.codegen import load_artifact
        from mcomp.compiler import ir
        from mcomp.runtime.fastdecode import fast_decoder
        from mcomp.runtime.kvcache import AttentionState
        gm = load_artifact(artifact).gm
        spec = ir.get_spec(gm)
        run = {}

        def prefill(ids):
            st = AttentionState(spec, 1, model=gm)
            st.reserve(ids.shape[1] + cfg.steps + 16)          # + warm-up and profiled steps
            st.last_logits_only = True
            for a in range(0, ids.shape[1], 1024):               # chunks, as `mcomp run` does
                pos = torch.arange(a, min(a + 1024, ids.shape[1]))[None]
                st.begin(pos)
                logits = gm(ids[:, a:a + 1024], pos, st)[:, -1]
            run.update(state=st, tok=logits.argmax(-1)[:, None], fast=fast_decoder(gm, st))

        def step():
            st, fast = run["state"], run["fast"]
            if fast is not None:
                logits = fast.step(run["tok"])
            else:
                pos = torch.tensor([[st.length]])
                st.begin(pos)
                logits = gm(run["tok"], pos, st)[:, -1]
            run["tok"] = logits.argmax(-1)[:, None]

        res = {"config": name, "runtime": "mcomp", "threads": torch.get_num_threads(),
               "weight_bytes": ir.weight_bytes(gm)}
        from mcomp.runtime.kv import model_bytes_per_token
        kv_per_token = model_bytes_per_token(spec)
        with torch.inference_mode():
            ids = _tokens(cfg.prefill, spec.vocab_size)
            prefill(ids[:, :32])
            t0 = time.perf_counter()
            prefill(ids)
            res["prefill_tok_s"] = cfg.prefill / (time.perf_counter() - t0)
            for ctx in cfg.contexts:
                res[f"decode@{ctx}"] = _time_decode(prefill, step, _tokens(ctx, spec.vocab_size), cfg.steps)
                res[f"bytes@{ctx}"] = res["weight_bytes"] + kv_per_token * (ctx + cfg.steps)
                if run["fast"] is not None:                      # where an engine step goes
                    eng = run["fast"].engine
                    eng.profile, eng.prof = True, [0.0] * len(ENGINE_PHASES)
                    for _ in range(8):
                        step()
                    eng.profile = False
                    res[f"phases@{ctx}"] = [t / 8 * 1e3 for t in eng.prof]
        res["path"] = "engine" if run["fast"] is not None else "graph"
        res["peak_rss_bytes"] = _peak_rss()
        q.put(res)
    except BaseException as e:
        q.put({"config": name, "error": f"{type(e).__name__}: {e}"})


def _llama_child(name: str, gguf: str, kv: str, cfg: AnchorConfig, q) -> None:
    try:
        import numpy as np
        from llama_cpp import Llama
        n_ctx = max(*cfg.contexts, cfg.prefill) + cfg.steps + 8     # the prefill prompt fits too
        llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=cfg.threads,
                    n_threads_batch=cfg.threads, n_batch=512, n_ubatch=512, flash_attn=True,
                    type_k=_KV_TYPES[kv], type_v=_KV_TYPES[kv], verbose=False)
        n_vocab = llm.n_vocab()
        meta = llm.metadata
        arch = meta.get("general.architecture", "llama")
        n_layer = int(meta[f"{arch}.block_count"])
        n_kv = int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"]))
        head = int(meta.get(f"{arch}.attention.key_length", 0)) or (
            int(meta[f"{arch}.embedding_length"]) // int(meta[f"{arch}.attention.head_count"]))
        kv_bytes = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[kv]
        run = {}

        def prefill(ids):
            llm.reset()
            llm.eval(ids[0].tolist())
            run["tok"] = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

        def step():
            llm.eval([run["tok"]])
            run["tok"] = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

        size = Path(gguf).stat().st_size
        res = {"config": name, "runtime": "llama.cpp", "threads": cfg.threads, "weight_bytes": size,
               "path": f"kv {kv}"}
        ids = _tokens(cfg.prefill, n_vocab)
        prefill(ids[:, :32])
        t0 = time.perf_counter()
        prefill(ids)
        res["prefill_tok_s"] = cfg.prefill / (time.perf_counter() - t0)
        for ctx in cfg.contexts:
            res[f"decode@{ctx}"] = _time_decode(prefill, step, _tokens(ctx, n_vocab), cfg.steps)
            res[f"bytes@{ctx}"] = size + 2 * n_layer * n_kv * head * kv_bytes * (ctx + cfg.steps)
        res["peak_rss_bytes"] = _peak_rss()
        q.put(res)
    except BaseException as e:
        q.put({"config": name, "error": f"{type(e).__name__}: {e}"})


# ----------------------------------------------------------------------------- driver

def requantize(src: Path, dst: Path, ftype: str) -> Path:
    """`src` GGUF → `dst` in llama.cpp's `ftype` (e.g. Q4_0), by llama.cpp itself."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {ftype}")
    return dst


def run(cfg: AnchorConfig = AnchorConfig(), progress=None) -> dict:
    from mcomp import api
    from mcomp.compiler.frontend.base import BUILTIN_MODELS
    from mcomp.errors import ConfigError
    try:
        import llama_cpp  # noqa: F401  (only: is it installed)
    except ImportError:
        raise ConfigError("mcomp bench anchors needs llama-cpp-python, built from source: see "
                          "docs/benchmarks.md (Anchors) for the command") from None
    if cfg.model not in BUILTIN_MODELS:
        raise ConfigError(f"anchors run on a built-in model (its GGUF is llama.cpp's input): "
                          f"{', '.join(BUILTIN_MODELS.names())}")
    shipped = Path(BUILTIN_MODELS.get(cfg.model)())
    tmp = Path(tempfile.mkdtemp(prefix="mcomp-anchors-"))
    jobs = []
    for w in cfg.mcomp_weights:
        if progress:
            progress(f"compiling mcomp {w}")
        spec, _, kv = w.partition("+")             # "WEIGHTS+KV": a row with a KV representation
        preset, weights = (spec, None) if ":" not in spec else (None, spec)
        out = tmp / w.replace(":", "_").replace("+", "__")
        api.optimize(cfg.model, preset, weights=weights, kv=kv or None, out=out)
        jobs.append((f"mcomp {w}", _mcomp_child, (str(out),)))
    for qn in cfg.llama_quants:
        gguf = shipped if qn == "shipped" else requantize(shipped, tmp / f"{qn}.gguf", qn)
        label = shipped.stem.rsplit(".", 1)[-1] if qn == "shipped" else qn
        for kv in cfg.llama_kv:
            jobs.append((f"llama.cpp {label}" + ("" if kv == "f16" else f" kv {kv}"),
                         _llama_child, (str(gguf), kv)))
    bw = copy_bandwidth(cfg.threads)
    rounds: dict[str, list[dict]] = {name: [] for name, _, _ in jobs}
    for r in range(cfg.rounds):
        for name, fn, args in jobs:
            if progress:
                progress(f"round {r + 1}/{cfg.rounds}: {name}")
            rounds[name].append(run_isolated(fn, (name, *args, cfg), name))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, rs in rounds.items():
        row = dict(rs[0])
        for key in ["prefill_tok_s", *(f"decode@{c}" for c in cfg.contexts)]:
            row[key] = statistics.median(r[key] for r in rs)
        row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in rs)
        for c in cfg.contexts:
            row[f"bound@{c}"] = row[f"bytes@{c}"] / bw * row[f"decode@{c}"]
        rows.append(row)
    return {"model": cfg.model, "threads": cfg.threads, "contexts": list(cfg.contexts),
            "prefill": cfg.prefill, "steps": cfg.steps, "rounds": cfg.rounds,
            "copy_bandwidth_GBps": bw / 1e9, "torch": torch.__version__,
            "llama_cpp_python": _llama_version(), "cpu": platform.processor() or platform.machine(),
            "rows": rows}


def _llama_version() -> str:
    try:
        import llama_cpp
        return llama_cpp.__version__
    except ImportError:
        return "-"


def to_markdown(res: dict) -> str:
    ctxs = res["contexts"]
    ref = next((r for r in res["rows"] if r["runtime"] == "llama.cpp"), res["rows"][0])
    head = ("| configuration | path | weights MB | prefill tok/s | "
            + " | ".join(f"decode tok/s @{c} (bound frac.)" for c in ctxs) + " | peak RSS MB |")
    lines = [head, "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in ctxs) + " | ---: |"]
    for r in res["rows"]:
        cells = [f"{r[f'decode@{c}']:.1f} ({r[f'decode@{c}'] / ref[f'decode@{c}']:.2f}×, "
                 f"{r[f'bound@{c}']:.2f})" for c in ctxs]
        lines.append(f"| {r['config']} | {r['path']} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['prefill_tok_s']:.0f} ({r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}×) | "
                     + " | ".join(cells) + f" | {r['peak_rss_bytes'] / 1e6:.0f} |")
    note = (f"{res['model']}, batch 1, {res['threads']} threads on both runtimes, prefill of "
            f"{res['prefill']} tokens, {res['steps']} greedy decode steps per context, median of "
            f"{res['rounds']} alternating rounds, each configuration in its own process; ratios "
            f"(×) are against `{ref['config']}` in the same run; bound frac. = bytes a step reads "
            f"(weights + KV at that context) ÷ measured copy bandwidth "
            f"({res['copy_bandwidth_GBps']:.1f} GB/s) ÷ measured step time. torch {res['torch']}, "
            f"llama-cpp-python {res['llama_cpp_python']}, {res['cpu']}.")
    prof = [(r["config"], c, r[f"phases@{c}"]) for r in res["rows"] for c in ctxs if f"phases@{c}" in r]
    if prof:
        lines += ["", "Where a decode step of the mcomp engine goes (ms per token, one profiled run of 8 "
                  "steps after the timed ones):", "",
                  "| configuration | context | " + " | ".join(ENGINE_PHASES) + " | total |",
                  "| --- | ---: | " + " | ".join("---:" for _ in ENGINE_PHASES) + " | ---: |"]
        for name, c, ph in prof:
            lines.append(f"| {name} | {c} | " + " | ".join(f"{t:.2f}" for t in ph) + f" | {sum(ph):.2f} |")
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot(res: dict, path: Path) -> bool:
    """Decode tok/s per context and prefill tok/s, one bar per configuration; False without
    matplotlib (the `bench` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, ctxs = res["rows"], res["contexts"]
    labels = [f"decode @{c}" for c in ctxs] + [f"prefill ({res['prefill']}) / 4"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        vals = [r[f"decode@{c}"] for c in ctxs] + [r["prefill_tok_s"] / 4]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, vals, width, label=r["config"],
               hatch="//" if r["runtime"] != "mcomp" else None, edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{res['model']}, batch 1, {res['threads']} threads, same run (hatched: llama.cpp)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)                       # atomic: never a half-written figure
    return True


LLAMA_BUILD = (
    "llama.cpp is llama-cpp-python built from source without the native CPU flags (the native "
    "AVX-512/AMX build crashes in decode on this machine's CPU): `CMAKE_ARGS=\"-DGGML_NATIVE=OFF "
    "-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AMX_INT8=OFF -DLLAMA_CURL=OFF\" pip install --no-binary :all: llama-cpp-python==0.3.36` "
    "(about 15 minutes on 2 cores).")


def write_report(res: dict, path: Path, command: str) -> None:
    from . import write_section
    path = Path(path)
    img = path.parent / "img" / f"anchors-{res['model']}.png"
    figure = f"![anchors {res['model']}](img/{img.name})\n\n" if plot(res, img) else ""
    write_section(path, f"anchors-{res['model']}",
                  f"## Anchors: mcomp vs llama.cpp, same run ({res['model']})\n\n"
                  f"Command: `{command}`\n\n" + LLAMA_BUILD + "\n\n" + figure + to_markdown(res)
                  + f"\n```json\n{json.dumps(res, indent=1)}\n```")
