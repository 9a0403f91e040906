"""Weight quantizer quality benchmark: RTN vs HQQ vs GPTQ vs AWQ at 4-bit g128 and 3-bit g128,
with reference points from other libraries measured in the same run.

    python benchmarks/bench_quant.py --model smollm2-135m [--methods rtn,hqq,gptq,awq]
        [--formats 4:g128,3:g128] [--references quanto-int4,hqq-pkg] [--max-tokens 4088]
        [--threads 1] [--out benchmarks/results/quant.json] [--write-docs]

Every mcomp configuration is compiled with `mcomp.optimize(model, "int4", weights="METHOD:BITS:gG")`
(q/k/v and gate/up fused, lm_head and embedding fp32, default calibration: 32 windows × 256
tokens of mcomp.data.calibration_text(), Pride and Prejudice) and scored with
`Session.compare` against the fp32 model (the "fp32" preset) on mcomp.data.evaluation_text()
(Persuasion, a different novel): BOS-prefixed non-overlapping 512-token windows, KL(fp32 ‖ q)
per predicted token, top-1 agreement, perplexity.

Reference rows quantize the Hugging Face transformers model of the same checkpoint
(`resolve_hf_dir(model)`, fp32) with another library, decoder linears only (lm_head and
embeddings fp32, like mcomp), and are scored by the *same* `Session.compare` call: the HF model
is wrapped in the IR call convention (`HFLogits`), so the windows, the fp32 logits it is compared
with (mcomp's fp32 model) and the metric code are identical to the mcomp rows'.

- `quanto-int4`: optimum-quanto `quantize(model, weights=qint4)` + `freeze`, its defaults (the
  MaxOptimizer min/max grid with a float shift, fp32 scales; group size 128, lowered by 32 until
  it divides in_features: 96 on SmolLM2's 576-wide inputs). quanto has no 3-bit type (qint2,
  qint4, qint8 only), so there is no quanto row at 3 bits.
- `hqq-pkg`: the `hqq` package's `HQQLinear` with `BaseQuantizeConfig(nbits, group_size=128,
  axis=1)` (its default solver: proximal, p = 0.7, β = 10, 20 iterations with early stopping;
  `round_zero` on for 4-bit as that config sets it), compute dtype fp32 (so scale/zero are
  kept in fp32; the package's fp16 default would run the CPU matmul in fp16). The package groups
  128 consecutive weights of the flattened row-major matrix, so when in_features is not a
  multiple of 128 (SmolLM2: 576) its groups straddle rows.

A row `hf:fp32` (the unquantized HF model through the same wrapper) checks the harness: its KL
against mcomp's fp32 model must be ~0. Results are appended to the JSON file as each
configuration finishes (rows already there are reused); --write-docs rewrites the `quant`
section of docs/benchmarks.md from every row in the file.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SECTION = "quant"
DEFAULT_OUT = Path("benchmarks/results/quant.json")
REFERENCES = ("quanto-int4", "hqq-pkg")
CALIBRATED = ("gptq", "awq")
log = logging.getLogger("bench_quant")


# ----------------------------------------------------------------------------- HF references

class HFLogits(nn.Module):
    """A transformers causal LM behind the IR call convention `gm(ids (B, T), positions (B, T),
    state) -> logits (B, T, V)` and carrying the mcomp spec in `.meta`, so `Session(HFLogits(..),
    tokenizer).compare(base, ...)` scores it with exactly the windows and metric code mcomp rows
    use. Runs outside inference mode (under no_grad): quanto's packed weights cannot be used on
    inference tensors ("Cannot set version_counter for inference tensor")."""

    def __init__(self, hf: nn.Module, spec):
        super().__init__()
        self.hf = hf
        self.meta = {"mcomp.spec": spec}

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, state=None) -> torch.Tensor:
        if state is not None:
            raise ValueError("HFLogits evaluates plain causal windows only (state=None)")
        with torch.inference_mode(False), torch.no_grad():
            ids, positions = ids.clone(), positions.clone()       # normal tensors, not inference
            out = self.hf(input_ids=ids, position_ids=positions, use_cache=False)
        return out.logits.float()                                  # (B, T, V)


def load_hf(model: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from mcomp.compiler.frontend import resolve_hf_dir

    return AutoModelForCausalLM.from_pretrained(resolve_hf_dir(model), dtype=torch.float32).eval()


def _decoder_linears(hf: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the decoder layers (so lm_head and
    the embedding are left alone)."""
    out = []
    for pname, parent in hf.model.layers.named_modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((parent, cname, child))
    return out


def quantize_quanto_int4(hf: nn.Module) -> dict:
    from optimum.quanto import QLinear, freeze, qint4, quantize

    quantize(hf, weights=qint4, include="model.layers.*")
    freeze(hf)
    qlins = [m for m in hf.model.layers.modules() if isinstance(m, QLinear)]
    nbytes = 0
    groups = set()
    for m in qlins:
        qw = m.weight
        nbytes += sum(t.numel() * t.element_size() for t in (qw._data._data, qw._scale, qw._shift))
        groups.add(m.weight_group_size)
    return {"linears": len(qlins), "linear_bytes": nbytes,
            "note": f"group sizes {sorted(groups)}, fp32 scale/shift"}


def quantize_hqq_pkg(hf: nn.Module, bits: int, group: int) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    nbytes = n = 0
    for parent, name, lin in _decoder_linears(hf):
        h = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu")
        setattr(parent, name, h)
        nbytes += h.W_q.numel() * h.W_q.element_size()
        nbytes += sum(h.meta[k].numel() * h.meta[k].element_size() for k in ("scale", "zero"))
        n += 1
    return {"linears": n, "linear_bytes": nbytes,
            "note": f"round_zero={cfg['weight_quant_params']['round_zero']}, fp32 scale/zero"}


def parse_format(fmt: str) -> tuple[int, int]:
    bits, g = fmt.split(":")
    return int(bits), int(g.lstrip("g"))


def reference_row(ref: str, fmt: str) -> tuple[str, str | None]:
    """(row label, reason it cannot run at this format or None)."""
    bits, g = parse_format(fmt)
    if ref == "quanto-int4":
        if bits != 4:
            return f"quanto:qint{bits}:g{g}", f"optimum-quanto has no {bits}-bit weight type " \
                                                "(qint2, qint4, qint8 only)"
        return f"quanto:qint4:g{g}", None
    if ref == "hqq-pkg":
        return f"hqq-pkg:{bits}:g{g}", None
    raise ValueError(f"unknown reference '{ref}' (choices: {', '.join(REFERENCES)})")


def quantize_reference(ref: str, hf: nn.Module, fmt: str) -> dict:
    bits, g = parse_format(fmt)
    if ref == "quanto-int4":
        if g != 128:
            raise ValueError("quanto's qint4 group size is fixed at 128 (lowered to divide K)")
        return quantize_quanto_int4(hf)
    return quantize_hqq_pkg(hf, bits, g)


# ----------------------------------------------------------------------------- run

def run(model: str, methods: list[str], formats: list[str], references: list[str],
        max_tokens: int, out: Path, threads: int | None) -> list[dict]:
    import mcomp
    from mcomp import data
    from mcomp.runtime.session import Session

    if threads:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["model"], r["weights"]) for r in rows}
    base = mcomp.optimize(model, "fp32")
    base_session = base.session()
    text = data.evaluation_text()
    common = {"model": model, "max_tokens": max_tokens, "threads": torch.get_num_threads()}

    def score(session: Session) -> dict:
        return session.compare(base_session, text, ctx=512, max_tokens=max_tokens)

    def save(row: dict) -> None:
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        log.info("%s %s: kld %.4f ppl %.2f (base %.2f) top1 %.3f, %.0fs", model, row["weights"],
                 row["kld"], row["ppl"], row["base_ppl"], row["top1_agreement"], row["compile_s"])

    def hf_session(hf: nn.Module) -> Session:
        return Session(HFLogits(hf, base_session.spec), base_session.tokenizer)

    if references and (model, "hf:fp32") not in done:   # harness check: HF fp32 vs mcomp fp32
        save({**common, "weights": "hf:fp32", "method": "hf-fp32", "format": "fp32",
              "reference": True, "compile_s": 0.0, "linear_bytes": None,
              **score(hf_session(load_hf(model)))})
    for fmt in formats:
        for method in methods:
            flag = f"{method}:{fmt}"
            if (model, flag) in done:
                continue
            t0 = time.perf_counter()
            res = mcomp.optimize(model, "int4", weights=flag)
            seconds = time.perf_counter() - t0
            wpass = res.report.passes[-1]
            save({**common, "weights": flag, "method": method, "format": fmt,
                  "compile_s": round(seconds, 1),
                  "linear_bytes": res.report.linear_bytes_after,
                  "weight_bytes": res.report.weight_bytes_after,
                  "probe_kld": wpass.drift_total["kld"] if wpass.drift_total else None,
                  **score(res.session())})
            del res
        for ref in references:
            label, why_not = reference_row(ref, fmt)
            if (model, label) in done:
                continue
            if why_not:
                log.info("%s %s skipped: %s", model, label, why_not)
                continue
            hf = load_hf(model)
            t0 = time.perf_counter()
            info = quantize_reference(ref, hf, fmt)
            seconds = time.perf_counter() - t0
            save({**common, "weights": label, "method": ref, "format": fmt, "reference": True,
                  "compile_s": round(seconds, 1), "linear_bytes": info["linear_bytes"],
                  "quantized_linears": info["linears"], "note": info["note"],
                  **score(hf_session(hf))})
            del hf
    return rows


# ----------------------------------------------------------------------------- report

METHOD_ORDER = ("rtn", "hqq", "gptq", "awq", "quanto-int4", "hqq-pkg")


def _order(r: dict) -> tuple:
    m = r["method"]
    return (bool(r.get("reference")), METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m)


def _kl(r: dict) -> str:
    return f"{r['kld']:.4f}"


def verdicts(rows: list[dict], model: str) -> list[str]:
    """One line per format: do calibrated methods beat RTN, is mcomp's best ≥ the references."""
    lines = []
    rs = [r for r in rows if r["model"] == model and r["format"] != "fp32"]
    for fmt in dict.fromkeys(r["format"] for r in rs):
        ours = [r for r in rs if r["format"] == fmt and not r.get("reference")]
        refs = [r for r in rs if r["format"] == fmt and r.get("reference")]
        parts = []
        rtn = next((r for r in ours if r["method"] == "rtn"), None)
        cal = [r for r in ours if r["method"] in CALIBRATED]
        if rtn and cal:
            beat = all(r["kld"] < rtn["kld"] for r in cal)
            parts.append(("calibrated methods beat RTN" if beat else "calibrated methods do NOT all "
                          "beat RTN") + " (" + ", ".join(
                f"{r['method'].upper()} {r['kld'] / rtn['kld']:.2f}× RTN's KL" for r in cal) + ")")
        if ours and refs:
            best = min(ours, key=lambda r: r["kld"])
            bref = min(refs, key=lambda r: r["kld"])
            ok = best["kld"] <= bref["kld"]
            parts.append(f"mcomp's best ({best['weights']}, KL {_kl(best)}, ppl {best['ppl']:.2f}) "
                         f"{'is at least as good as' if ok else 'is WORSE than'} the best reference "
                         f"({bref['weights']}, KL {_kl(bref)}, ppl {bref['ppl']:.2f})")
            same = [r for r in ours if r["method"] == "hqq"]
            pkg = [r for r in refs if r["method"] == "hqq-pkg"]
            if same and pkg:
                parts.append(f"HQQ: mcomp KL {_kl(same[0])} vs hqq package {_kl(pkg[0])}")
        if parts:
            lines.append(f"- **{fmt}**: " + "; ".join(parts) + ".")
    return lines


def table(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        r0 = next(r for r in rs if r["format"] != "fp32")
        lines += [f"### {model}", "",
                  f"fp32 perplexity {r0['base_ppl']:.2f}; {r0['tokens_scored']} tokens scored "
                  f"({r0['windows']} windows × {r0['ctx'] - 1} predicted tokens).", ""]
        hf = next((r for r in rs if r["weights"] == "hf:fp32"), None)
        if hf:
            lines += [f"Harness check: the unquantized HF transformers model through the same "
                      f"wrapper vs mcomp's fp32 model: KL {hf['kld']:.2e} (max {hf['kld_max']:.1e}), "
                      f"top-1 agreement {hf['top1_agreement']:.4f}.", ""]
        lines += ["| weights | KL vs fp32 | top-1 agreement | ppl | decoder linear MB | quantize s |",
                  "|---|---|---|---|---|---|"]
        for fmt in dict.fromkeys(r["format"] for r in rs if r["format"] != "fp32"):
            sub = [r for r in rs if r["format"] == fmt]
            sub.sort(key=_order)                                       # mcomp rows first
            best = min(r["kld"] for r in sub)
            rtn = next((r["kld"] for r in sub if r["method"] == "rtn"), None)
            for r in sub:
                kl = _kl(r)
                if r["kld"] == best:
                    kl = f"**{kl}**"
                if rtn and r["method"] != "rtn":
                    kl += f" ({r['kld'] / rtn:.2f}× RTN)"
                name = f"*ref* {r['weights']}" if r.get("reference") else r["weights"]
                mb = f"{r['linear_bytes'] / 1e6:.1f}" if r.get("linear_bytes") else "–"
                lines.append(f"| {name} | {kl} | {r['top1_agreement']:.3f} | {r['ppl']:.2f} | "
                             f"{mb} | {r['compile_s']:.0f} |")
            if fmt.startswith("3:") and any(r.get("reference") for r in rs):
                lines.append("| *ref* quanto:qint3:g128 | n/a: optimum-quanto has no 3-bit type "
                             "| | | | |")
        lines += ["", *verdicts(rows, model), ""]
    return "\n".join(lines)


def commands(rows: list[dict], out: Path) -> list[str]:
    cmds = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        methods = ",".join(dict.fromkeys(r["method"] for r in sorted(rs, key=_order)
                                         if not r.get("reference")))
        formats = ",".join(dict.fromkeys(r["format"] for r in rs if r["format"] != "fp32"))
        refs = ",".join(m for m in REFERENCES if any(r["method"] == m for r in rs))
        r0 = rs[-1]
        cmd = (f"python benchmarks/bench_quant.py --model {model} --methods {methods} "
               f"--formats {formats}" + (f" --references {refs}" if refs else " --references none")
               + f" --max-tokens {r0.get('max_tokens', 4088)}"
               + (f" --threads {r0['threads']}" if r0.get("threads") else "") + f" --out {out}")
        cmds.append(cmd)
    return cmds


def write_docs(rows: list[dict], out: Path) -> None:
    from importlib.metadata import version

    from mcomp.bench import write_section

    threads = sorted({r["threads"] for r in rows if r.get("threads")})
    body = "\n".join([
        "## Weight quantizers: RTN, HQQ, GPTQ, AWQ (quality), with reference libraries",
        "",
        "Commands (one per model, rows accumulate in the JSON file; `--write-docs` on the last):",
        "",
        "```",
        *commands(rows, out),
        "```",
        "",
        "Calibration: 32 windows × 256 tokens of Pride and Prejudice (`mcomp.data.calibration_text()`); "
        "evaluation: Persuasion (`mcomp.data.evaluation_text()`), BOS-prefixed non-overlapping "
        "512-token windows, KL(fp32 ‖ quantized) per predicted token against mcomp's fp32 model. "
        "mcomp rows: q/k/v and gate/up fused, asymmetric, integer zero points for RTN/GPTQ/AWQ "
        "(HQQ: a float zero refined from a rounded start), fp16 scales, lm_head and embedding fp32. The fp32 checkpoint was "
        "itself dequantized from a 4-bit GGUF, so read the 3-bit rows and the KL column first. "
        "Bold: lowest KL per format.",
        "",
        f"Reference rows (*ref*, same run, same windows, same `Session.compare` code through a "
        f"wrapper around the HF transformers model of the same checkpoint; decoder linears only): "
        f"optimum-quanto {version('optimum-quanto')} `qint4` weights with its defaults (min/max "
        f"grid, float shift, fp32 scales; group 128 lowered to 96 where in_features = 576, i.e. "
        f"finer than mcomp's g128 on most SmolLM2 matrices; quanto has no 3-bit type), and the "
        f"`hqq` package {version('hqq')} `HQQLinear` with `BaseQuantizeConfig(nbits, "
        f"group_size=128, axis=1)` (default solver; fp32 scale/zero; its groups run over the "
        f"flattened matrix, so they straddle rows where in_features = 576). \"decoder linear MB\" "
        f"counts codes + scales + zeros as each library stores them.",
        "",
        table(rows),
        "Reading. *Calibrated vs RTN at 3 bits*: on both models GPTQ and AWQ cut RTN's KL by "
        "about 2–3× (see the verdict lines). *mcomp vs references at equal bits*: mcomp's best "
        "row (AWQ or GPTQ) has well under half the KL of the best reference at 4 bits (quanto "
        "has no 3-bit type; at 3 bits the only reference is the hqq package). "
        "Calibration-free against calibration-free (mcomp's HQQ vs the hqq package, the "
        "like-for-like pair): mcomp's is better at 3 bits on both models (the package's 3-bit "
        "default starts from a float zero, below) and at 4 bits on SmolLM2; on Gemma at 4 bits "
        "the package is slightly better (KL 0.378 vs 0.392, both starting from a rounded zero; "
        "the package also keeps fp32 scale/zero where mcomp stores fp16, and stops the solver "
        "tensor-wide where mcomp keeps the best iterate per group; on single matrices the two "
        "are within 2% in weight error). quanto's int4 (min/max grid, float shift) sits near "
        "RTN. Rows of one model may come from several invocations of its command (results "
        "accumulate in the JSON file; SmolLM2's RTN/GPTQ/AWQ rows were computed first, with the "
        "same settings): the quality numbers do not depend on the invocation, quantize times do.",
        "",
        "*Why the hqq package (and a float-zero grid in general) loses to RTN at 3 bits here*: "
        "starting from the min/max grid's float zero point, 0 is usually not on the grid, so small "
        "weights get an error up to half a step instead of at most their own size. On SmolLM2 a "
        "few v_proj input channels (after RMSNorm) carry activations 500–5000× the median "
        "channel's power while their weights are small (~0.2× the median |w|), so that error is "
        "multiplied by the outlier activation: layer 12's v_proj at 3-bit g128 has 0.94× the "
        "weight MSE of integer-zero RTN but 3.2× its output error. The package's "
        "`BaseQuantizeConfig` rounds the start zero at 4 bits only; mcomp's HQQ rounds it at every "
        "width (`round_zero`, default since pass version 2; before, mcomp started from the float "
        "zero and measured KL 2.41 on SmolLM2 3-bit g128, worse than RTN's 1.47). With it, "
        "mcomp's HQQ ties RTN at 3 bits and beats it at 4 bits; the weight-space objective "
        "still cannot see activations, which is what GPTQ and AWQ add. "
        "`tests/quant/test_hqq.py::test_real_smollm2_*` pins this on the real matrices (mcomp's "
        "HQQ within 2% of the package's weight error and 5% of its output error at the same "
        "setting; the outlier-channel effect).",
        "",
        f"torch {torch.__version__}, {platform.machine()}, {', '.join(map(str, threads)) or '?'} "
        f"thread(s) (`torch.set_num_threads`); the machine was shared with other jobs, so "
        f"quantize times are indicative only.",
    ])
    write_section(ROOT / "docs" / "benchmarks.md", SECTION, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rtn,hqq,gptq,awq")
    ap.add_argument("--formats", default="4:g128,3:g128")
    ap.add_argument("--references", default=",".join(REFERENCES),
                    help=f"comma list of {', '.join(REFERENCES)}, or 'none'")
    ap.add_argument("--max-tokens", type=int, default=4088)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    refs = [] if a.references in ("", "none") else a.references.split(",")
    for r in refs:
        if r not in REFERENCES:
            ap.error(f"unknown reference '{r}' (choices: {', '.join(REFERENCES)}, none)")
    methods = [m for m in a.methods.split(",") if m]
    rows = run(a.model, methods, a.formats.split(","), refs, a.max_tokens, a.out, a.threads)
    if a.write_docs:
        write_docs(rows, a.out)
    print(table(rows))


if __name__ == "__main__":
    main()
