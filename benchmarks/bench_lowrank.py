"""Low-rank / channel-shrunk KV quality per byte → docs/benchmarks.md (bench:kv-lowrank markers)
and docs/img/kv_lowrank_bytes_vs_kl.png.

For each model, KV scheme (a `--kv` shorthand through apply_kv_flag: palu and think calibrate on
the embedded calibration text, Pride and Prejudice; so does eigen) and evaluation domain, the same protocol as
the xquant-vs-KIVI table: fp32 weights, 512-token windows (BOS first), 1022 text tokens scored in
quantize-before-attend mode (`Session.streaming_perplexity(mode="prefill")`: every query sees the
cache state token-by-token decode would have had). KL and top-1 are against the same model
attending without a cache. "KV B/token" is the amortized bytes of one more token over all layers
(what `mcomp inspect` reports; fp windows and sinks excluded).

Domains: `persuasion` (the embedded evaluation text, Austen like the calibration text: the
flattering case) and `code` (mcomp's own compiler, runtime and quant modules at commit 96be9bf,
`cat mcomp/compiler/*.py mcomp/runtime/*.py mcomp/quant/*.py`, read from git: the same text as
the xquant table's second domain).

    python benchmarks/bench_lowrank.py --model smollm2-135m [--schemes palu:0.5 ...]
    python benchmarks/bench_lowrank.py --render-only

Each (model, scheme) is calibrated once and evaluated on every domain; rows are kept per
(model, scheme, domain) in --json, so a run with --schemes updates only those rows.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "benchmarks" / "results" / "kv_lowrank.json"
PLOT = ROOT / "docs" / "img" / "kv_lowrank_bytes_vs_kl.png"
BEGIN, END = "<!-- bench:kv-lowrank:begin -->", "<!-- bench:kv-lowrank:end -->"
CODE_COMMIT = "96be9bf"

#: (shorthand, family) in table order
SCHEMES = [
    ("kivi4", "kivi"), ("kivi2", "kivi"), ("kivi2:s4", "kivi"),
    ("xquant:2:s4:g64", "xquant"),
    ("palu:0.25", "palu"), ("palu:0.5", "palu"), ("palu:0.5:uniform", "palu"),
    ("palu:0.25:kivi4:s4", "palu+kivi"), ("palu:0.4:kivi4:s4", "palu+kivi"),
    ("palu:0.1:kivi2:s4", "palu+kivi"), ("palu:0.1:kivi2:s4:white", "palu+kivi"),
    ("palu:0.25:kivi2:s4", "palu+kivi"), ("palu:0.1:kivi2", "palu+kivi"),
    ("palu:0.05:kivi2:s4", "palu+kivi"),
    ("think:0.25", "think"), ("think:0.5", "think"),
    ("think:0.25:kivi2:s4", "think+kivi"), ("think:0.4:kivi2:s4", "think+kivi"),
    ("eigen:0.05", "eigen"), ("eigen:0.1", "eigen"), ("eigen:0.1:pca", "eigen"),
    ("eigen:0.05:kivi2:s4", "eigen+kivi"), ("eigen:0.1:kivi2:s4", "eigen+kivi"),
    ("eigen:0.1:kivi4:s4", "eigen+kivi"),
    ("cskv:0.25", "cskv"), ("cskv:0.5", "cskv"),
    ("cskv:0.1:kivi2:s4", "cskv+kivi"), ("cskv:0.05:kivi2:s4", "cskv+kivi"),
]
DOMAINS = ("persuasion", "code")


def code_text() -> str:
    """mcomp's compiler, runtime and quant modules at CODE_COMMIT, concatenated in glob order."""
    def git(*a):
        return subprocess.run(["git", "-C", str(ROOT), *a], check=True, capture_output=True,
                              text=True).stdout
    names = [n for n in git("ls-tree", "--name-only", CODE_COMMIT, "mcomp/compiler/",
                            "mcomp/runtime/", "mcomp/quant/").split()]
    files = sorted(n for n in names if n.endswith(".py"))
    order = [f for d in ("mcomp/compiler/", "mcomp/runtime/", "mcomp/quant/")
             for f in files if f.startswith(d) and "/" not in f[len(d):]]
    return "".join(git("show", f"{CODE_COMMIT}:{f}") for f in order)


def texts() -> dict[str, str]:
    from mcomp import data
    return {"persuasion": data.evaluation_text(), "code": code_text()}


def measure(model: str, kv: str, domains: dict[str, str], args) -> list[dict]:
    from mcomp.api import load
    from mcomp.passes.assign_kv import apply_kv_flag
    s = load(model)
    t0 = time.perf_counter()
    stats = apply_kv_flag(s.gm, kv, s.tokenizer)
    calib = time.perf_counter() - t0
    s.spec = s.gm.meta["mcomp.spec"]
    rows = []
    for dom, text in domains.items():
        t1 = time.perf_counter()
        res = s.streaming_perplexity(text, ctx=args.ctx, max_tokens=args.max_tokens, mode="prefill")
        rows.append({"model": model, "kv": kv, "domain": dom, "ppl": res["ppl"],
                     "base_ppl": res["base_ppl"], "kld": res["kld"],
                     "top1": res["top1_agreement"], "kv_bytes_per_token": res["kv_bytes_per_token"],
                     "tokens": res["tokens_scored"], "calib_seconds": round(calib, 1),
                     "eval_seconds": round(time.perf_counter() - t1, 1),
                     "ranks_kv": stats[-1].get("ranks_kv")})
        print(f"{model} {kv:>22} {dom:>10}: ppl {res['ppl']:.3f} (no cache {res['base_ppl']:.3f}) "
              f"KL {res['kld']:.5f} top-1 {res['top1_agreement']:.4f} "
              f"{res['kv_bytes_per_token']} B/token", flush=True)
    return rows


def render(rows: list[dict]) -> str:
    family = dict(SCHEMES)
    order = {k: i for i, (k, _) in enumerate(SCHEMES)}
    out = [BEGIN, "## Low-rank and channel-shrunk KV (Palu, ThinK, Eigen Attention, CSKV) vs KIVI and xquant", "",
           "`python benchmarks/bench_lowrank.py --model MODEL` — fp32 weights, 512-token windows, "
           "1022 tokens scored in quantize-before-attend mode; KL / top-1 against the same model "
           "without a cache; KV B/token as `mcomp inspect` reports it (fp windows and sinks "
           "excluded). palu, think, eigen and cskv calibrate on the embedded Pride and Prejudice text; "
           "`persuasion` is Austen too, `code` is mcomp's own source at commit "
           f"{CODE_COMMIT} (the xquant table's second domain). 2 threads.", ""]
    for dom in DOMAINS:
        out += [f"### {dom}", "", "| model | `--kv` | family | ppl | Δppl | KL | top-1 | KV B/token |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for model in dict.fromkeys(r["model"] for r in rows):
            rs = sorted((r for r in rows if r["model"] == model and r["domain"] == dom),
                        key=lambda r: order.get(r["kv"], 99))
            if not rs:
                continue
            out.append(f"| {model} | no cache | - | {rs[0]['base_ppl']:.4f} | 0 | 0 | 100% | - |")
            for r in rs:
                d = 100 * (r["ppl"] / r["base_ppl"] - 1)
                out.append(f"| {model} | `{r['kv']}` | {family.get(r['kv'], '?')} | {r['ppl']:.4f} | "
                           f"{d:+.1f}% | {r['kld']:.5f} | {100 * r['top1']:.2f}% | "
                           f"{r['kv_bytes_per_token']} |")
        out.append("")
    out += ["![KV bytes per token vs KL](img/kv_lowrank_bytes_vs_kl.png)", "", END]
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    family = dict(SCHEMES)
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), len(DOMAINS), figsize=(11, 4.2 * len(models)),
                             squeeze=False)
    style = {"kivi": ("o", "tab:gray"), "xquant": ("D", "tab:purple"), "palu": ("s", "tab:blue"),
             "palu+kivi": ("^", "tab:orange"), "think": ("v", "tab:green"),
             "think+kivi": ("<", "tab:olive"), "eigen": ("P", "tab:red"),
             "eigen+kivi": ("X", "tab:brown"), "cskv": ("p", "tab:cyan"),
             "cskv+kivi": ("h", "tab:pink")}
    for i, model in enumerate(models):
        for j, dom in enumerate(DOMAINS):
            ax = axes[i][j]
            rs = [r for r in rows if r["model"] == model and r["domain"] == dom]
            for fam, (m, c) in style.items():
                pts = [r for r in rs if family.get(r["kv"]) == fam]
                if pts:
                    ax.scatter([r["kv_bytes_per_token"] for r in pts], [r["kld"] for r in pts],
                               marker=m, color=c, label=fam)
                    for r in pts:
                        ax.annotate(r["kv"], (r["kv_bytes_per_token"], r["kld"]), fontsize=7,
                                    textcoords="offset points", xytext=(3, 3), color=c)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{model}, {dom}")
            ax.set_xlabel("KV bytes per token (all layers)")
            ax.set_ylabel("KL vs no cache")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def write_section(rows: list[dict], path: Path) -> None:
    doc = path.read_text()
    section = render(rows)
    if BEGIN in doc:
        a, b = doc.index(BEGIN), doc.index(END) + len(END)
        doc = doc[:a] + section + doc[b:]
    else:
        doc = doc.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", nargs="*", default=None)
    ap.add_argument("--domains", nargs="*", default=list(DOMAINS), choices=DOMAINS)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=1023)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=JSON)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    if not args.render_only:
        all_texts = texts()
        doms = {d: all_texts[d] for d in args.domains}
        for kv in args.schemes or [k for k, _ in SCHEMES]:
            new = measure(args.model, kv, doms, args)
            keys = {(r["model"], r["kv"], r["domain"]) for r in new}
            rows = [r for r in rows if (r["model"], r["kv"], r["domain"]) not in keys] + new
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1))
    write_section(rows, args.out)
    plot(rows)


if __name__ == "__main__":
    main()
