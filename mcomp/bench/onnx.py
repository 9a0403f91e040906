"""mcomp's runtime vs onnxruntime-genai on mcomp's ONNX export vs onnxruntime-genai on the
model builder's own int4 model of the same checkpoint, in one run, same threads.

Rows
- `mcomp runtime · W`: the mcomp artifact compiled with weights W (prefill on the graph, decode
  on the C++ engine), as `mcomp run` executes it;
- `genai · mcomp W`: the ONNX export of that same artifact (`mcomp export`, MatMulNBits
  accuracy_level 4 as the builder's CPU models), run by onnxruntime-genai;
- `genai · builder int4`: `python -m onnxruntime_genai.models.builder -i HF -o DIR -p int4 -e cpu`
  on the HF folder mcomp imports (RTN, symmetric, block 32, int4 tied embedding, level 4).

Speed: every (row, round) in its own spawned process, rows alternating within a round, medians
over rounds; random token ids (content does not change speed). Prefill: one forward over
`prefill_tokens` tokens. Decode at context C: a C-token prompt, then `decode_steps` greedy
tokens, timed after the first. Quality: KL(fp32 ‖ row) per token and top-1 agreement on the
embedded evaluation text (BOS + 511-token windows), and on each `texts` file (other domains:
calibration is Austen, and one domain flatters a calibrated quantizer), the fp32 model being
mcomp's import of the same folder; ONNX rows through plain onnxruntime on the same graph genai runs.
"""
from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import run_isolated


@dataclass(frozen=True)
class OnnxBenchConfig:
    model: str = "smollm2-135m"
    weights: tuple[str, ...] = ("rtn:4:g128:emb8", "gptq:4:g64:emb4g32")
    threads: int = 2
    prefill_tokens: int = 512
    contexts: tuple[int, ...] = (128, 2048)
    decode_steps: int = 32
    rounds: int = 3
    kl_tokens: int = 4096
    kl_ctx: int = 512
    builder: bool = True
    texts: tuple[str, ...] = ()      # extra evaluation texts (files), KL per text


def _tokens(n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab - 1, (n,), generator=g).tolist()


def _genai_child(path: str, cfg: OnnxBenchConfig, vocab: int, q) -> None:
    try:
        import onnxruntime_genai as og

        from .runtime import _peak_rss
        model = og.Model(path)
        res = {"threads": cfg.threads}

        def gen(n_ctx: int, steps: int):
            p = og.GeneratorParams(model)
            p.set_search_options(max_length=n_ctx + steps + 1, do_sample=False)
            g = og.Generator(model, p)
            t0 = time.perf_counter()
            g.append_tokens(_tokens(n_ctx, vocab))
            t_prefill = time.perf_counter() - t0
            g.generate_next_token()                   # first step outside the timing
            t0 = time.perf_counter()
            for _ in range(steps):
                g.generate_next_token()
            return t_prefill, time.perf_counter() - t0

        gen(64, 1)                                    # warm-up
        t, _ = gen(cfg.prefill_tokens, 1)
        res["prefill_tok_s"] = cfg.prefill_tokens / t
        for c in cfg.contexts:
            _, t = gen(c, cfg.decode_steps)
            res[f"decode_tok_s@{c}"] = cfg.decode_steps / t
        res["peak_rss_bytes"] = _peak_rss()
        q.put(res)
    except BaseException as e:
        q.put({"error": f"{type(e).__name__}: {e}"})


def _mcomp_child(path: str, cfg: OnnxBenchConfig, vocab: int, q) -> None:
    from .runtime import BenchConfig, _child
    rc = BenchConfig(model=cfg.model, threads=cfg.threads, prefill_tokens=cfg.prefill_tokens,
                     decode_contexts=cfg.contexts, decode_steps=cfg.decode_steps, repeats=1)
    _child("mcomp", path, rc, q)


def _set_threads(folder: Path, threads: int) -> None:
    """Pin onnxruntime-genai's session to `threads` intra-op threads (its genai_config)."""
    p = folder / "genai_config.json"
    c = json.loads(p.read_text())
    c["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads,
                                                     inter_op_num_threads=1)
    p.write_text(json.dumps(c, indent=2))


def _onnx_bytes(folder: Path) -> int:
    return sum((folder / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))


def _eval_texts(cfg: OnnxBenchConfig) -> dict[str, str]:
    """label → text: the embedded evaluation text first, then each --text file by its name."""
    from mcomp import data
    texts = {"persuasion": data.evaluation_text()}
    for f in cfg.texts:
        texts[Path(f).name] = Path(f).read_text(encoding="utf-8", errors="replace")
    return texts


def _quality(rows, cfg: OnnxBenchConfig, progress=None) -> None:
    """KL(fp32 ‖ row) and top-1 on the evaluation windows of every text, filled into each row:
    `kld`/`top1` for the embedded text, `kld_by_text`/`top1_by_text` for all of them."""
    from mcomp import api
    from mcomp.codegen import load_artifact
    from mcomp.codegen.onnx.run import OrtDecoder
    from mcomp.compiler import ir
    from mcomp.compiler.frontend import import_model
    from mcomp.runtime import metrics
    torch.set_num_threads(cfg.threads)
    imp = import_model(cfg.model)
    base = ir.build(imp.spec, imp.state_dict)
    sess = api.load(rows[0]["path"])
    for r in rows:
        r.update(kld_by_text={}, top1_by_text={}, tokens_by_text={})
    # texts outside, rows inside: one text's fp32 logits are held at a time (W·ctx·V floats,
    # 0.8 GB for SmolLM2, 4.3 GB for Gemma's 262k vocab); rows reload per text, which is cheap
    for label, text in _eval_texts(cfg).items():
        wins = sess.windows(text, cfg.kl_ctx, cfg.kl_tokens)                    # (W, ctx)
        with torch.inference_mode():
            ref = [base(w[None], torch.arange(w.numel())[None])[0, :-1] for w in wins]
        for r in rows:
            if progress:
                progress(f"quality on {label}: {r['config']}")
            if r["kind"] == "mcomp":
                gm = load_artifact(r["path"]).gm
                with torch.inference_mode():
                    outs = [gm(w[None], torch.arange(w.numel())[None])[0, :-1] for w in wins]
                del gm
            else:
                dec = OrtDecoder(r["path"], threads=cfg.threads)
                outs = [torch.from_numpy(dec.logits(w.tolist()))[:-1] for w in wins]
                del dec
            kl = torch.cat([metrics.token_kl(a, b).double() for a, b in zip(ref, outs)])
            top1 = torch.cat([metrics.token_top1(a, b) for a, b in zip(ref, outs)])
            r["kld_by_text"][label] = float(kl.mean())
            r["top1_by_text"][label] = float(top1.float().mean())
            r["tokens_by_text"][label] = kl.numel()
    for r in rows:
        r.update(kld=r["kld_by_text"]["persuasion"], top1=r["top1_by_text"]["persuasion"],
                 tokens_scored=r["tokens_by_text"]["persuasion"])


def run(cfg: OnnxBenchConfig = OnnxBenchConfig(), progress=None) -> dict:
    from mcomp import api
    from mcomp.compiler.frontend import resolve_hf_dir
    import onnxruntime
    import onnxruntime_genai
    hf_dir = resolve_hf_dir(cfg.model)
    tmp = Path(tempfile.mkdtemp(prefix="mcomp-bench-onnx-"))
    rows = []
    try:
        for w in cfg.weights:
            if progress:
                progress(f"compiling {w}")
            art = tmp / w.replace(":", "_")
            api.optimize(cfg.model, weights=w, out=art)
            exp = api.export(art, tmp / (art.name + "-onnx"))   # a separate folder: its genai
            _set_threads(exp, cfg.threads)                       # config is edited below
            rows.append({"config": f"mcomp runtime · {w}", "kind": "mcomp", "path": str(art),
                         "file_bytes": (art / "model.safetensors").stat().st_size})
            rows.append({"config": f"genai · mcomp {w}", "kind": "genai", "path": str(exp),
                         "file_bytes": _onnx_bytes(exp)})
        if cfg.builder:
            if progress:
                progress("onnxruntime-genai builder int4")
            out = tmp / "builder-int4"
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                   "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(tmp / "builder-cache")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"onnxruntime-genai builder failed: {r.stderr.strip()[-400:]}")
            _set_threads(out, cfg.threads)
            rows.append({"config": "genai · builder int4", "kind": "genai", "path": str(out),
                         "file_bytes": _onnx_bytes(out)})
        if not rows:
            raise RuntimeError("nothing to measure: no --weights and no builder row")
        vocab = json.loads(Path(rows[-1]["path"], "genai_config.json").read_text())["model"]["vocab_size"]
        samples: dict[str, list[dict]] = {r["config"]: [] for r in rows}
        for rnd in range(cfg.rounds):
            order = rows if rnd % 2 == 0 else rows[::-1]       # alternate: drift hits every row
            for r in order:
                if progress:
                    progress(f"round {rnd + 1}/{cfg.rounds}: {r['config']}")
                child = _mcomp_child if r["kind"] == "mcomp" else _genai_child
                samples[r["config"]].append(run_isolated(child, (r["path"], cfg, vocab), r["config"]))
        keys = ["prefill_tok_s"] + [f"decode_tok_s@{c}" for c in cfg.contexts]
        for r in rows:
            s = samples[r["config"]]
            for k in keys:
                r[k] = statistics.median(x[k] for x in s)
            r["peak_rss_bytes"] = max(x["peak_rss_bytes"] for x in s)
        _quality(rows, cfg, progress)
        env = {"threads": cfg.threads, "torch": torch.__version__,
               "onnxruntime": onnxruntime.__version__,
               "onnxruntime_genai": getattr(onnxruntime_genai, "__version__", "?"),
               "cpu": platform.processor() or platform.machine()}
        for r in rows:
            r.pop("path")
        return {"config": asdict(cfg), "env": env, "rows": rows}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def command(cfg: OnnxBenchConfig) -> str:
    parts = [f"mcomp bench onnx --model {cfg.model}"]
    parts += [f"--weights {w}" for w in cfg.weights]
    parts += [f"--ctx {c}" for c in cfg.contexts]
    parts += [f"--text {t}" for t in cfg.texts]
    parts.append(f"--threads {cfg.threads} --rounds {cfg.rounds}")
    return " ".join(parts)


def to_markdown(res: dict) -> str:
    cfg = OnnxBenchConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in res["config"].items()})
    rows = res["rows"]
    base = next((r for r in rows if r["config"] == "genai · builder int4"), rows[0])
    ctx_cols = [f"decode_tok_s@{c}" for c in cfg.contexts]
    labels = list(rows[0]["kld_by_text"])
    head = ("| configuration | file MB | " + " | ".join(f"KL {t}" for t in labels)
            + " | top-1 | prefill tok/s | " + " | ".join(f"decode @{c}" for c in cfg.contexts)
            + " | peak RSS MB |")
    lines = [head, "| --- |" + " ---: |" * (4 + len(labels) + len(ctx_cols))]
    for r in rows:
        cells = [f"{r[k]:.1f} ({r[k] / base[k]:.2f}×)" for k in ["prefill_tok_s", *ctx_cols]]
        kls = " | ".join(f"{r['kld_by_text'][t]:.4f}" for t in labels)
        lines.append(f"| {r['config']} | {r['file_bytes'] / 1e6:.1f} | {kls} | "
                     f"{100 * r['top1']:.1f}% | " + " | ".join(cells)
                     + f" | {r['peak_rss_bytes'] / 1e6:.0f} |")
    scored = ", ".join(f"{t} {n}" for t, n in rows[0]["tokens_by_text"].items())
    e = res["env"]
    note = (f"{cfg.model}, batch 1, {e['threads']} threads for every row (torch.set_num_threads; "
            f"genai session intra_op_num_threads), onnxruntime {e['onnxruntime']}, "
            f"onnxruntime-genai {e['onnxruntime_genai']}, torch {e['torch']}, {e['cpu']}; "
            f"medians of {cfg.rounds} alternating rounds, each row in its own process; "
            f"{cfg.decode_steps} greedy decode steps; prefill over {cfg.prefill_tokens} tokens; "
            "ratios against `genai · builder int4` in the same run. KL against the fp32 model "
            f"(windows of {cfg.kl_ctx}) on the embedded evaluation text (persuasion) and each "
            f"--text file; top-1 on persuasion; tokens scored: {scored}. "
            "File MB: model.safetensors "
            "(mcomp runtime) or model.onnx + model.onnx.data (ONNX rows).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_report(res: dict, path: Path, name: str = "onnx") -> None:
    from . import write_section
    cfg = res["config"]
    body = (f"## ONNX export: mcomp runtime vs onnxruntime-genai (mcomp's export, the builder's int4), {cfg['model']}\n\n"
            f"Command: `{command(OnnxBenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}))}`\n\n"
            + to_markdown(res) + "\n<details><summary>raw results</summary>\n\n```json\n"
            + json.dumps(res, indent=1) + "\n```\n</details>")
    write_section(path, f"{name}-{cfg['model']}", body)
