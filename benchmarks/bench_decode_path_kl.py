"""Does the decode path change quality? KL vs the fp32 model of one artifact's logits computed
two ways, on several text domains:

  - window: one forward over the text (prefill path: ≥ 16 rows go to the ATen int4/int8 GEMM
    kernels, bf16 activations);
  - engine: token-by-token decode through the C++ engine (integer-dot linears, activations
    rounded to two int8 digits per block of 32), after a 16-token prefill.

    python benchmarks/bench_decode_path_kl.py ARTIFACT [--base smollm2-135m] [--tokens 512]
        [--text FILE ...]

Default texts: the embedded Persuasion sample; pass others with --text (the closing notes used
mcomp's own source and /usr/share/common-licenses/GPL-3). Prints one markdown row per text;
the first 16 positions (the prefill) are left out of every KL.
"""
from __future__ import annotations

import argparse
import math

import torch


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--text", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from mcomp import api
    from mcomp.compiler import ir
    from mcomp.data import evaluation_text
    from mcomp.runtime.fastdecode import fast_decoder
    from mcomp.runtime.kvcache import AttentionState
    base, q = api.load(a.base), api.load(a.artifact)
    texts = [("persuasion (embedded)", evaluation_text())] + [(p, open(p).read()) for p in a.text]
    P, N = 16, a.tokens
    print("| text | tokens | ppl fp32 | ppl window | KL window | ppl engine | KL engine | KL(window ‖ engine) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, text in texts:
        ids = torch.tensor(base.tokenizer.encode(text)[:N])[None]
        n = ids.shape[1]
        with torch.inference_mode():
            pos = torch.arange(n)[None]
            ref, win = base.gm(ids, pos, None)[0], q.gm(ids, pos, None)[0]
            st = AttentionState(ir.get_spec(q.gm), 1, model=q.gm)
            st.reserve(n + 1)
            st.last_logits_only = True
            st.begin(pos[:, :P])
            q.gm(ids[:, :P], pos[:, :P], st)
            fast = fast_decoder(q.gm, st)
            if fast is None:
                raise SystemExit(f"{a.artifact}: the model does not lower to the decode engine")
            eng = torch.cat([win[:P], torch.stack([fast.step(ids[:, t:t + 1])[0] for t in range(P, n)])])
        t = ids[0]
        print(f"| {name} | {n} | {_ppl(ref, t):.2f} | {_ppl(win, t):.2f} | {_kl(ref[P:], win[P:]):.5f} | "
              f"{_ppl(eng, t):.2f} | {_kl(ref[P:], eng[P:]):.5f} | {_kl(win[P:], eng[P:]):.6f} |")


if __name__ == "__main__":
    main()
