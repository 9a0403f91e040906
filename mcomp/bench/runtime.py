"""Runtime benchmark: HF transformers eager fp32 vs mcomp fp32 vs mcomp int4 (RTN g128).

Each configuration runs in its own spawned process (so peak RSS is its own), one after the
other in the same invocation, with the same thread count; speeds are reported as absolute
numbers and as ratios to HF eager measured in the same run (absolute numbers drift on shared
machines, ratios much less). Measured per configuration:
  - prefill tokens/s: one forward over a 512-token prompt (batch 1), median of repeats, with
    logits for the last position only, as generation needs them (transformers:
    `logits_to_keep=1`; mcomp: `AttentionState.last_logits_only`), i.e. time to first token;
  - decode tokens/s at 128 and 2048 tokens of context: prefill the context (untimed), then
    greedy single-token steps through the KV cache, timed; mcomp's steps take the path
    `generate` takes (the C++ decode engine when the model lowers to it, else the graph);
  - weight bytes (what the model holds), peak RSS of the process.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import run_isolated

CONFIGS = ("hf-eager-fp32", "mcomp-fp32", "mcomp-int4")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    threads: int = 2
    prefill_tokens: int = 512
    decode_contexts: tuple[int, ...] = (128, 2048)
    decode_steps: int = 32
    repeats: int = 3


def _tokens(n: int, vocab: int) -> torch.Tensor:
    """Real text tokens would change nothing for speed; a fixed pseudo-random stream suffices."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab - 1, (1, n), generator=g)


def _hf_runner(hf_dir: str):
    from transformers import AutoModelForCausalLM, DynamicCache
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}

    # transformers 5.24 renamed past_key_values → cache; accept either
    import inspect
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(ids, cache):
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache}).logits

    return forward, DynamicCache, sum(params.values()), model.config.vocab_size


_UNBOUND = object()    # a Run whose decode path is not chosen yet (fast_decoder may return None)


def _mcomp_runner(artifact: str):
    from mcomp.codegen import load_artifact
    from mcomp.compiler import ir
    from mcomp.runtime.kvcache import AttentionState
    gm = load_artifact(artifact).gm
    spec = ir.get_spec(gm)

    from mcomp.runtime.fastdecode import fast_decoder

    class Run:
        """A sequence's state and, from its first decode step on, the decode engine when the
        model has one: the path `generate` takes (prefill on the graph, steps on the engine)."""
        def __init__(self):
            self.state = AttentionState(spec, 1, model=gm)
            self.state.last_logits_only = True  # the benchmark reads logits[:, -1:], like generate
            self.fast = _UNBOUND                    # decided at the first decode step

    def forward(ids, run):
        if ids.shape[1] == 1:
            if run.fast is _UNBOUND:
                run.fast = fast_decoder(gm, run.state)
            if run.fast is not None:
                return run.fast.step(ids)[:, None]             # (1, 1, V)
        state = run.state
        n = state.length
        pos = torch.arange(n, n + ids.shape[1])[None]
        state.begin(pos)
        return gm(ids, pos, state)

    new_state = Run

    return forward, new_state, ir.weight_bytes(gm), spec.vocab_size


def _peak_rss() -> int:
    """This process's own peak RSS. Not getrusage: Linux carries ru_maxrss across fork/exec,
    so a spawned child would report its parent's peak. VmHWM belongs to the address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(name: str, target: str, cfg: BenchConfig, q) -> None:
    try:
        torch.set_num_threads(cfg.threads)
        if name.startswith("hf"):
            forward, new_cache, wbytes, vocab = _hf_runner(target)
        else:
            forward, new_cache, wbytes, vocab = _mcomp_runner(target)
        res = {"config": name, "threads": torch.get_num_threads(), "weight_bytes": wbytes}
        with torch.inference_mode():
            ids = _tokens(cfg.prefill_tokens, vocab)
            forward(ids[:, :64], new_cache())  # warm-up
            times = []
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                forward(ids, new_cache())
                times.append(time.perf_counter() - t0)
            res["prefill_tok_s"] = cfg.prefill_tokens / statistics.median(times)
            for ctx in cfg.decode_contexts:
                cache = new_cache()
                logits = forward(_tokens(ctx, vocab), cache)
                nxt = logits[:, -1:].argmax(-1)
                forward(nxt, cache)  # first step outside the timing (allocations)
                t0 = time.perf_counter()
                for _ in range(cfg.decode_steps):
                    nxt = forward(nxt, cache)[:, -1:].argmax(-1)
                res[f"decode_tok_s@{ctx}"] = cfg.decode_steps / (time.perf_counter() - t0)
        res["peak_rss_bytes"] = _peak_rss()
        q.put(res)
    except BaseException as e:  # report to the parent instead of dying silently
        q.put({"config": name, "error": f"{type(e).__name__}: {e}"})


def run(cfg: BenchConfig = BenchConfig(), progress=None) -> list[dict]:
    from mcomp import api
    from mcomp.compiler.frontend import resolve_hf_dir
    hf_dir = str(resolve_hf_dir(cfg.model))
    tmp = Path(tempfile.mkdtemp(prefix="mcomp-bench-"))
    targets = {"hf-eager-fp32": hf_dir}
    for name, preset in (("mcomp-fp32", "fp32"), ("mcomp-int4", "int4")):
        if progress:
            progress(f"compiling {name}")
        api.optimize(cfg.model, preset, out=tmp / name)
        targets[name] = str(tmp / name)
    results = []
    for name in CONFIGS:
        if progress:
            progress(f"measuring {name}")
        results.append(run_isolated(_child, (name, targets[name], cfg), name))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def to_markdown(results: list[dict], cfg: BenchConfig) -> str:
    base = results[0]
    cols = ["prefill_tok_s"] + [f"decode_tok_s@{c}" for c in cfg.decode_contexts]
    head = ("| configuration | weight MB | peak RSS MB | prefill tok/s (512) | "
            + " | ".join(f"decode tok/s @{c}" for c in cfg.decode_contexts) + " |")
    lines = [head, "|" + "---|" * (4 + len(cfg.decode_contexts))]
    for r in results:
        cells = [f"{r[c]:.1f} ({r[c] / base[c]:.2f}×)" for c in cols]
        lines.append(f"| {r['config']} | {r['weight_bytes'] / 1e6:.1f} | {r['peak_rss_bytes'] / 1e6:.0f} | "
                     + " | ".join(cells) + " |")
    env = (f"{cfg.model}, batch 1, {results[0]['threads']} threads (torch.set_num_threads), "
           f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
           f"{cfg.decode_steps} greedy decode steps, median of {cfg.repeats} prefills; "
           "ratios are against hf-eager-fp32 in the same run.")
    return "\n".join(lines) + "\n\n" + env + "\n"


def write_report(results: list[dict], cfg: BenchConfig, path: Path) -> None:
    """Replace the runtime section of docs/benchmarks.md (other sections are kept)."""
    from . import write_section
    write_section(path, "runtime",
                  "## Runtime: HF eager vs mcomp fp32 vs mcomp int4\n\n"
                  f"Command: `mcomp bench runtime --model {cfg.model} --threads {cfg.threads}`\n\n"
                  + to_markdown(results, cfg) + f"\n```json\n{json.dumps(results, indent=1)}\n```")
