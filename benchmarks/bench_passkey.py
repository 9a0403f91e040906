"""Passkey retrieval under KV-cache quantization → docs/benchmarks.md (bench:kv-passkey section)
and benchmarks/results/passkey_<model>.json.

The Landmark Attention / LongLoRA passkey prompt (mcomp.runtime.passkey) at each length, one
trial per needle depth (spread over 0.1..0.9) with a seeded random 5-digit key: the haystack is
prefilled as one chunk (once per trial, shared by every scheme: prefill attends in full
precision whatever the cache), then the question is fed token by token and the answer generated
greedily through each scheme's cache, so retrieval reads the cache as stored (KIVI: quantized
store plus fp residual window). Reported per length and scheme: accuracy, and whether each
scheme's answers equal the dense fp32 cache's trial by trial (the KV-quantization issue's
criterion for 4-bit KV).

    python benchmarks/bench_passkey.py --model smollm2-135m --lengths 1024,2048,4096,8192 \\
        --trials 5 --schemes dense,kivi4,kivi4:s4,kivi2,kivi2:hv:hk:s16 --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

JSON_DIR = Path("benchmarks/results")

LABELS = {
    "dense": "dense fp32",
    "kivi8": "kivi8 (g32, r128)",
    "kivi4": "kivi4 (g32, r128)",
    "kivi4:s4": "kivi4 (g32, r128, 4 sink tokens)",
    "kivi2": "kivi2 (g32, r128)",
    "kivi2:hv:hk:s16": "kivi2 + Hadamard V + K, 16 sink tokens",
}


def json_path(model: str) -> Path:
    return JSON_DIR / f"passkey_{model}.json"


def command(res: dict) -> str:
    c = res["config"]
    return (f"python benchmarks/bench_passkey.py --model {res['model']} "
            f"--lengths {','.join(map(str, c['lengths']))} --trials {c['trials']} "
            f"--schemes {','.join(c['schemes'])} --threads {res['threads']}"
            + (f" --seed {c['seed']}" if c["seed"] else ""))


def yes_no(flag: bool) -> str:
    return "yes" if flag else "**no**"


def to_markdown(res: dict) -> str:
    c = res["config"]
    ref = c["reference"]
    schemes = c["schemes"]
    others = [s for s in schemes if s != ref]
    by = {(r["length"], r["scheme"]): r for r in res["summary"]}
    head = ["length"] + [f"`{s}` correct" for s in schemes] \
        + [f"`{s}` = `{ref}`" for s in others] + ["s / trial"]
    lines = [
        "## KV-cache quantization: passkey retrieval",
        "",
        f"Command: `{command(res)}` — {res['model']}, {res['threads']} threads, torch "
        f"{res['torch']}, wall time {res['wall_seconds'] / 60:.1f} min.",
        "",
        f"{c['trials']} trials per length, needle depths {', '.join(f'{d:g}' for d in c['depths'])} "
        f"of the filler, 5-digit keys seeded by (seed {c['seed']}, length, trial); length = "
        f"prompt + {c['answer_tokens']} answer tokens (the prompt is exactly length − "
        f"{c['answer_tokens']} model tokens, BOS included). The haystack is prefilled as one "
        "chunk; the question (`\\nWhat is the pass key? The pass key is`) is fed token by token "
        f"and {c['answer_tokens']} tokens generated greedily, all through the cache's decode path "
        "(KIVI: the fast kernel over the quantized store and the fp residual window). An answer is "
        "the first run of digits generated; \"= dense\" counts trials where a scheme's answer "
        "equals the dense fp32 cache's.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---:"] * len(head)) + " |",
    ]
    for n in c["lengths"]:
        cells = [str(n)]
        for s in schemes:
            r = by[(n, s)]
            cells.append(f"{r['correct']}/{r['trials']}")
        for s in others:
            r = by[(n, s)]
            cells.append(f"{r['matches_reference']}/{r['trials']}")
        per = [t for t in res["trials"] if t["length"] == n]
        secs = sum(t["prefill_seconds"] + sum(a["seconds"] for a in t["answers"].values())
                   for t in per) / max(len(per), 1)
        cells.append(f"{secs:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for s in others:
        lines.append(f"- `{s}` ({LABELS.get(s, s)}) answers equal the fp cache's on every trial "
                     f"at every length: {yes_no(res['matches_reference'][s])}")
    n_trials = len(res["trials"])
    for s in others:
        if s.startswith("kivi4"):
            diff = sum(t["answers"][s]["answer"] != t["answers"][ref]["answer"]
                       for t in res["trials"])
            lines.append(f"- **4-bit == fp on every trial (`{s}`): "
                         f"{'yes' if not diff else 'no'}**"
                         + (f" — differs on {diff} of {n_trials} trials" if diff else
                            f" ({n_trials} trials)"))
    # where the needle sat when the answer began (KIVI keeps the last 128..159 tokens in fp)
    q = [(n, by[(n, s)]["needle_quantized"], by[(n, s)]["trials"]) for n in c["lengths"]
         for s in others[:1] if by[(n, s)]["needle_quantized"] is not None]
    if q:
        lines.append("- Needle in the quantized store (not the fp residual window) when the "
                     "answer began: " + ", ".join(f"{k}/{t} trials at {n}" for n, k, t in q) + ".")
    wrong = [(t["length"], t["depth"], t["key"], s, t["answers"][s]["text"])
             for t in res["trials"] for s in schemes if not t["answers"][s]["correct"]]
    if wrong:
        lines += ["", "Wrong answers (length, depth, key, scheme, generated text):", ""]
        lines += [f"- {n}, {d:g}, {k}, `{s}`: `{text!r}`" for n, d, k, s, text in wrong]
    # how close a call the reference's answer was where a 4/8-bit scheme disagrees with it
    hi = [s for s in others if s.startswith(("kivi4", "kivi8"))]
    differ = [t for t in res["trials"]
              if any(t["answers"][s]["answer"] != t["answers"][ref]["answer"] for s in hi)]
    if differ:
        lines += ["", f"First answer token where a 4- or 8-bit scheme's answer differs from "
                  f"`{ref}`'s (3 most likely tokens, probability):", ""]
        for t in differ:
            for s in [ref] + [s for s in others
                              if t["answers"][s]["answer"] != t["answers"][ref]["answer"]]:
                top = ", ".join(f"`{w!r}` {math.exp(lp):.2f}"
                                for w, lp in t["answers"][s]["first_top"])
                lines.append(f"- {t['length']}, depth {t['depth']:g}, `{s}`: {top}")
    lines += ["", f"Raw results: `{json_path(res['model'])}`."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--schemes", default="dense,kivi4,kivi4:s4,kivi2,kivi2:hv:hk:s16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--no-write", action="store_true", help="do not write the markdown section")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing; rewrite the section from the stored JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mcomp.bench import write_section

    path = json_path(args.model)
    if args.render_only:
        res = json.loads(path.read_text())
    else:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        from mcomp.api import load
        from mcomp.runtime import passkey as pk

        cfg = pk.PasskeyConfig(lengths=pk.parse_lengths(args.lengths),
                               schemes=tuple(s for s in args.schemes.split(",") if s.strip()),
                               trials=args.trials, seed=args.seed)
        session = load(args.model)
        t0 = time.perf_counter()
        console = Console(stderr=True)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as prog:
            task = prog.add_task("passkey", total=None)

            def update(done, total, text):
                prog.update(task, completed=done, total=total, description=f"passkey {text}")
                if not console.is_terminal and text:   # a log file gets one line per step
                    print(f"[{done}/{total}] {text} ({time.perf_counter() - t0:.0f} s)",
                          file=sys.stderr, flush=True)

            rep = pk.run_passkey(session, cfg, progress=update)
        res = {"model": args.model, "threads": args.threads, "torch": torch.__version__,
               "machine": platform.machine(), "wall_seconds": round(time.perf_counter() - t0, 1),
               **rep.to_dict()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    if not args.no_write:
        write_section(args.out, "kv-passkey", md)
    print(md)


if __name__ == "__main__":
    main()
