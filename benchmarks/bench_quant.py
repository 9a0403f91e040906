"""Weight quantizer quality benchmark: RTN vs HQQ vs GPTQ vs AWQ at 4-bit g128 and 3-bit g128.

    python benchmarks/bench_quant.py --model smollm2-135m [--methods rtn,hqq,gptq,awq]
        [--formats 4:g128,3:g128] [--max-tokens 4088] [--out bench_quant.json] [--write-docs]

Every configuration is compiled with `mcomp.optimize(model, "int4", weights="METHOD:BITS:gG")`
(q/k/v and gate/up fused, lm_head and embedding fp32, default calibration: 32 windows × 256
tokens of mcomp.data.calibration_text(), Pride and Prejudice) and scored with
`Session.compare` against the fp32 model (the "fp32" preset) on mcomp.data.evaluation_text()
(Persuasion, a different novel): BOS-prefixed non-overlapping 512-token windows, KL(fp32 ‖ q)
per predicted token, top-1 agreement, perplexity. Results are appended to the JSON file as each
configuration finishes; --write-docs rewrites the quant section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:quant:begin -->", "<!-- bench:quant:end -->"


def run(model: str, methods: list[str], formats: list[str], max_tokens: int, out: Path,
        threads: int | None) -> list[dict]:
    import mcomp
    from mcomp import data

    if threads:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["model"], r["weights"]) for r in rows}
    base = mcomp.optimize(model, "fp32")
    base_session = base.session()
    text = data.evaluation_text()
    for fmt in formats:
        for method in methods:
            flag = f"{method}:{fmt}"
            if (model, flag) in done:
                continue
            t0 = time.perf_counter()
            res = mcomp.optimize(model, "int4", weights=flag)
            seconds = time.perf_counter() - t0
            cmp = res.session().compare(base_session, text, ctx=512, max_tokens=max_tokens)
            wpass = res.report.passes[-1]
            rows.append({"model": model, "weights": flag, "method": method, "format": fmt,
                         "compile_s": round(seconds, 1),
                         "linear_bytes": res.report.linear_bytes_after,
                         "weight_bytes": res.report.weight_bytes_after,
                         "probe_kld": wpass.drift_total["kld"] if wpass.drift_total else None,
                         **cmp})
            logging.info("%s %s: kld %.4f ppl %.2f (base %.2f) top1 %.3f, %.0fs", model, flag,
                         cmp["kld"], cmp["ppl"], cmp["base_ppl"], cmp["top1_agreement"], seconds)
            out.write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        r0 = rs[0]
        lines += [f"### {model}", "",
                  f"fp32 perplexity {r0['base_ppl']:.2f}; {r0['tokens_scored']} tokens scored "
                  f"({r0['windows']} windows × {r0['ctx'] - 1} predicted tokens).", "",
                  "| weights | KL vs fp32 | top-1 agreement | ppl | decoder linear MB | compile s |",
                  "|---|---|---|---|---|---|"]
        for fmt in dict.fromkeys(r["format"] for r in rs):
            sub = [r for r in rs if r["format"] == fmt]
            best = min(r["kld"] for r in sub)
            rtn = next((r["kld"] for r in sub if r["method"] == "rtn"), None)
            for r in sub:
                kl = f"{r['kld']:.4f}"
                if r["kld"] == best:
                    kl = f"**{kl}**"
                if rtn and r["method"] != "rtn":
                    kl += f" ({r['kld'] / rtn:.2f}× RTN)"
                lines.append(f"| {r['weights']} | {kl} | {r['top1_agreement']:.3f} | "
                             f"{r['ppl']:.2f} | {r['linear_bytes'] / 1e6:.1f} | {r['compile_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def write_docs(rows: list[dict], command: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text(encoding="utf-8")
    body = "\n".join([
        BEGIN,
        "## Weight quantizers: RTN, HQQ, GPTQ, AWQ (quality)",
        "",
        f"Command: `{command}`",
        "",
        "Calibration: 32 windows × 256 tokens of Pride and Prejudice (`mcomp.data.calibration_text()`); "
        "evaluation: Persuasion (`mcomp.data.evaluation_text()`), BOS-prefixed non-overlapping "
        "512-token windows, KL(fp32 ‖ quantized) per predicted token. q/k/v and gate/up fused, "
        "asymmetric, integer zero points for RTN/GPTQ/AWQ (float zero for HQQ), fp16 scales, lm_head "
        "and embedding fp32. The fp32 checkpoint was itself dequantized from a 4-bit GGUF, so read "
        "the 3-bit rows and the KL column first. Bold: lowest KL per format.",
        "",
        table(rows),
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads.",
        END,
    ])
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    doc.write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rtn,hqq,gptq,awq")
    ap.add_argument("--formats", default="4:g128,3:g128")
    ap.add_argument("--max-tokens", type=int, default=4088)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench_quant.json"))
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = run(a.model, a.methods.split(","), a.formats.split(","), a.max_tokens, a.out, a.threads)
    if a.write_docs:
        models = ",".join(dict.fromkeys(r["model"] for r in rows))
        write_docs(rows, f"python benchmarks/bench_quant.py --model {models} --methods {a.methods} "
                         f"--formats {a.formats} --max-tokens {a.max_tokens} --write-docs")
    print(table(rows))


if __name__ == "__main__":
    main()
