"""The C++ decode-step engine (runtime/fastdecode.py, kernels/csrc/decode_step.cpp) against the IR
graph on the same model and state, which is its reference.

Tolerances. What differs between the paths is the summation order of norms and attention and
the polynomial exp (|rel err| < 2e-7):
  - fp32 models: ≤ 1e-5 · max|logit| at every one of 40 steps (measured ≤ 1.1e-6);
  - quantized models: the engine's quantized linears run the same kernels on the same operands
    as the graph's, so the paths differ only where an input differing by one fp32 ulp rounds to
    the neighbouring activation value: a rare bf16 flip in the ATen kernels (int4 g32 here,
    measured up to 4e-3 of the logit scale), a frequent but 60× smaller digit flip in the
    integer-dot kernel (a step of max|x_b| / 16256; measured ≤ 1.4e-4). From then on two
    free-running decodes drift apart, so these are compared step by step from the same caches
    (`one_step`: the graph computes the step, then the engine recomputes it over the same rows):
    ≥ 90% of steps within 2e-4, every step within 2e-2. How the engine writes K/V over many
    steps is what the free-running fp32 cases test;
  - fp16 / bf16 dense caches: both paths store the new K/V rounded to nearest even and attend
    over the widened values, but a K/V value one fp32 ulp apart can round to the neighbouring
    16-bit value, so they are compared step by step like the quantized models;
a real lowering bug (a wrong norm weight, RoPE halves swapped, a window off by one, a missing
bias) moves the logits of every step by ≥ 1e-2 of their scale.
"""
from __future__ import annotations

import pytest
import torch

from mcomp.compiler.spec import LayerSpec, ModelSpec, RopeSpec
from mcomp.runtime import kernels
from mcomp.runtime.fastdecode import fast_decoder
from mcomp.runtime.generate import generate_ids
from mcomp.runtime.kernels import decode_step
from mcomp.runtime.kvcache import AttentionState
from tests.helpers import tiny_gm, tiny_spec

pytestmark = pytest.mark.skipif(not decode_step.available(), reason="no C++ toolchain")

V = 128
PROMPT = 12
STEPS = 40


def _layer(**kw) -> LayerSpec:
    base = dict(n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, rope=RopeSpec(theta=10000.0, dim=16))
    base.update(kw)
    return LayerSpec(**base)


def gemma_like() -> ModelSpec:
    """sandwich norms, qk-norm, a local layer (window 7, its own RoPE base) and a global one,
    gelu_tanh, scaled embedding, query scale ≠ head_dim^-½, final softcap."""
    local = _layer(window=7, qk_norm=True, sandwich_norm=True, rope=RopeSpec(theta=10.0, dim=16))
    glob = _layer(qk_norm=True, sandwich_norm=True, rope=RopeSpec(theta=1e4, dim=16))
    return ModelSpec(family="gemma3", vocab_size=V, hidden_size=64, layers=(local, glob, local),
                     act="gelu_tanh", embed_scale=8.0, attn_scale=0.2, final_logit_softcap=5.0,
                     norm_eps=1e-6, bos_token_id=1, eos_token_ids=(2,))


def qwen_like() -> ModelSpec:
    return tiny_spec(layers=(_layer(qk_norm=True, qkv_bias=True),) * 2, family="qwen3")


def pruned_like() -> ModelSpec:
    """heterogeneous layers as FLAP leaves them: heads, KV heads and FFN width per layer, biases."""
    return tiny_spec(layers=(_layer(n_heads=2, n_kv_heads=1, ffn_dim=40, o_bias=True, down_bias=True),
                             _layer(n_heads=4, n_kv_heads=4, ffn_dim=72, mlp_bias=True)))


def plain_mlp() -> ModelSpec:
    return tiny_spec(gated_mlp=False, act="relu", layers=(_layer(rope=None),) * 2)


def rtn4(gm, embedding_bits: int = 0, group: int = 32):
    """g32 runs the ATen int4 kernel, g64 the integer-dot one (kernels/int_dot.py)."""
    from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig
    cfg = RTNConfig(bits=4, group_size=group, skip_roles=(), embedding_bits=embedding_bits,
                    embedding_group_size=0 if embedding_bits else None)
    return QuantizeWeightsRTN(cfg).run(gm, None).gm


def rtn8(gm):
    from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig
    return QuantizeWeightsRTN(RTNConfig(bits=8, group_size=0)).run(gm, None).gm


def fused(gm):
    from mcomp.passes.fuse_gate_up import FuseGateUp, FuseGateUpConfig
    from mcomp.passes.fuse_qkv import FuseQKV, FuseQKVConfig
    gm = FuseQKV(FuseQKVConfig()).run(gm, None).gm
    return FuseGateUp(FuseGateUpConfig()).run(gm, None).gm


def dense_kv(gm, dtype: str):
    from mcomp.passes.assign_kv import AssignKV, AssignKVConfig
    return AssignKV(AssignKVConfig(kv=f"dense:{dtype}")).run(gm, None).gm


def decode_logits(gm, fast: bool, steps: int = STEPS, prompt: int = PROMPT,
                  one_step: bool = False) -> torch.Tensor:
    """(steps, V) logits of greedy decode steps after a prefill, on the engine or the graph.
    one_step (with fast): each step is first run by the graph, then the caches are rewound and
    the engine runs it over the same rows; returns (engine, graph) logits, (steps, V) each."""
    spec = gm.meta["mcomp.spec"]
    ids = torch.randint(3, V, (1, prompt), generator=torch.Generator().manual_seed(1))
    state = AttentionState(spec, 1, model=gm)
    state.last_logits_only = True
    out, graph_out = [], []
    with torch.inference_mode():
        pos = torch.arange(prompt)[None]
        state.begin(pos)
        logits = gm(ids, pos, state)[:, -1]
        engine = fast_decoder(gm, state) if fast else None
        assert (engine is not None) == fast
        tok = logits.argmax(-1)[:, None]
        for n in range(prompt, prompt + steps):
            if one_step:
                p = torch.tensor([[n]])
                state.begin(p)
                graph_out.append(gm(tok, p, state)[:, -1].clone())
                for c in state.caches:                      # rewind: the engine rewrites row n
                    c.length = n
                state.key_pos, state.key_valid = state.key_pos[:, :n], state.key_valid[:, :n]
            if fast:
                logits = engine.step(tok)
            else:
                p = torch.tensor([[n]])
                state.begin(p)
                logits = gm(tok, p, state)[:, -1]
            out.append(logits.clone())
            tok = logits.argmax(-1)[:, None]
    assert state.length == prompt + steps and all(c.length == state.length for c in state.caches)
    return (torch.cat(out), torch.cat(graph_out)) if one_step else torch.cat(out)


CASES = {
    "llama-fp32": lambda: tiny_gm(),
    "llama-int4": lambda: rtn4(tiny_gm()),
    "llama-int4-fused-emb8": lambda: rtn4(fused(tiny_gm()), embedding_bits=8),
    "llama-int4-g64": lambda: rtn4(tiny_gm(), group=64),
    "llama-int8": lambda: rtn8(tiny_gm()),
    "gemma3-int4-g64": lambda: rtn4(tiny_gm(gemma_like()), group=64),
    "qwen3-int4-g64-emb8": lambda: rtn4(tiny_gm(qwen_like()), embedding_bits=8, group=64),
    "qwen3-int4": lambda: rtn4(tiny_gm(qwen_like())),
    "gemma3-fp32": lambda: tiny_gm(gemma_like()),
    "gemma3-int4": lambda: rtn4(tiny_gm(gemma_like())),
    "pruned-int4": lambda: rtn4(tiny_gm(pruned_like())),
    "plain-mlp-no-rope": lambda: tiny_gm(plain_mlp()),
    "llama-fp32-kv-fp16": lambda: dense_kv(tiny_gm(), "fp16"),
    "llama-int4-kv-bf16": lambda: dense_kv(rtn4(tiny_gm()), "bf16"),
    "gemma3-fp32-kv-bf16": lambda: dense_kv(tiny_gm(gemma_like()), "bf16"),
}
# exact: the paths differ only in summation order, so free-running decodes stay together; the
# others (quantized weights, or K/V rounded to 16 bits, where an ulp of difference in a new K/V
# value can round to the neighbouring stored value) are compared step by step


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_matches_graph(case):
    gm = CASES[case]()
    quantized = not (case.endswith("fp32") or "no-rope" in case)
    if quantized:
        got, ref = decode_logits(gm, fast=True, one_step=True)
    else:
        ref, got = decode_logits(gm, fast=False), decode_logits(gm, fast=True)
    err = (got - ref).abs().amax(-1) / ref.abs().max()                     # (steps,)
    if quantized:
        assert err.max() <= 2e-2 and (err <= 2e-4).float().mean() >= 0.9, (case, err)
    else:
        assert err.max() <= 1e-5, (case, err.max())
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_window_is_exercised():
    """the local layers' window changes the logits of this run (so the gemma case tests it)."""
    spec = gemma_like()
    wide = ModelSpec(**{**spec.__dict__, "layers": tuple(
        LayerSpec(**{**l.__dict__, "window": None}) for l in spec.layers)})
    a, b = decode_logits(tiny_gm(spec), fast=True), decode_logits(tiny_gm(wide), fast=True)
    assert (a - b).abs().max() > 1e-2 * b.abs().max()


def test_generate_uses_engine_and_keeps_greedy_tokens(monkeypatch):
    gm = rtn4(tiny_gm())
    prompt = [[5, 9, 17, 33, 4]]
    used = []
    import mcomp.runtime.generate as gen
    real = gen.fast_decoder
    monkeypatch.setattr(gen, "fast_decoder", lambda g, s: used.append(real(g, s)) or used[-1])
    fast = generate_ids(gm, prompt, max_new_tokens=30, stop_at_eos=False)
    assert used and used[0] is not None
    monkeypatch.setattr(gen, "fast_decoder", lambda g, s: None)
    slow = generate_ids(gm, prompt, max_new_tokens=30, stop_at_eos=False)
    assert fast == slow and len(fast[0]) == 30


def _state_after_prefill(gm, batch=1, kv=None):
    spec = gm.meta["mcomp.spec"]
    state = AttentionState(spec, batch, model=gm)
    ids = torch.randint(3, V, (batch, 6))
    pos = torch.arange(6).expand(batch, -1)
    with torch.inference_mode():
        state.begin(pos)
        gm(ids, pos, state)
    return state


def test_refuses_what_it_cannot_express():
    from mcomp.compiler import ir
    from mcomp.passes.assign_kv import AssignKV, AssignKVConfig
    gm = tiny_gm()
    assert fast_decoder(gm, _state_after_prefill(gm)) is not None
    assert fast_decoder(gm, _state_after_prefill(gm, batch=2)) is None              # batch
    with kernels.reference_mode():                                                  # reference
        assert fast_decoder(gm, _state_after_prefill(gm)) is None
    kivi = AssignKV(AssignKVConfig(kv="kivi4")).run(tiny_gm(), None).gm             # KV kind
    assert fast_decoder(kivi, _state_after_prefill(kivi)) is None
    bf16 = AssignKV(AssignKVConfig(kv="dense:bf16")).run(tiny_gm(), None).gm      # read as bf16
    assert fast_decoder(bf16, _state_after_prefill(bf16)) is not None
    # a graph some pass rewrote (here: the final logits scaled by an extra node) is not canonical
    odd = tiny_gm()
    out = next(n for n in odd.graph.nodes if n.op == "output")
    with odd.graph.inserting_before(out):
        scaled = odd.graph.call_function(torch.mul, (out.args[0], 2.0))
    out.args = (scaled,)
    odd.recompile()
    ir.get_spec(odd)
    assert fast_decoder(odd, _state_after_prefill(odd)) is None


def test_buffers_grow_past_initial_capacity():
    """decoding past the caches' capacity re-binds the grown buffers (64 → 128 rows here)."""
    gm = tiny_gm()
    ref = decode_logits(gm, fast=False, steps=120, prompt=4)
    got = decode_logits(gm, fast=True, steps=120, prompt=4)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_generate_reserves_the_final_length(monkeypatch):
    """generate allocates prompt + max_new_tokens rows up front: no growth copy, no doubling
    overshoot (a 8192-token context used to end in a 16384-row cache), same tokens."""
    from mcomp.runtime.kv.dense import DenseKVCache
    gm = tiny_gm()
    grown = []
    real = DenseKVCache._grow
    monkeypatch.setattr(DenseKVCache, "_grow", lambda self, cap, *a: grown.append(cap) or real(self, cap, *a))
    prompt = [[5, 9, 17, 33, 4]]
    fast = generate_ids(gm, prompt, max_new_tokens=100, stop_at_eos=False)
    assert set(grown) == {105}                     # one allocation per layer, of the final size
    state = _state_after_prefill(gm)               # no reservation: the cache doubles
    c = state.caches[0]
    before = c.k[:, :, : c.length].clone()
    c.reserve(200)
    assert c.capacity == 200 and torch.equal(c.k[:, :, : c.length], before)
    c.reserve(10)                                  # never shrinks
    assert c.capacity == 200
    monkeypatch.setattr("mcomp.runtime.generate.fast_decoder", lambda g, s: None)
    assert generate_ids(gm, prompt, max_new_tokens=100, stop_at_eos=False) == fast


# ------------------------------------------------------------------ the engine's own kernels

def test_fast_exp_accuracy():
    ext = decode_step.load()
    x = torch.cat([torch.linspace(-86.9, 88, 100001), torch.tensor([-1e4, -87.0, 0.0])])
    y, ref = ext.fast_exp(x), torch.exp(x.double())
    rel = ((y.double() - ref).abs() / ref.clamp_min(1e-300))[: 100001]
    assert float(rel.max()) < 4e-7
    assert y[-3] == 0 and y[-2] == 0 and y[-1] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,lo,hi,D", [(4, 2, 0, 1, 32), (6, 2, 0, 300, 32), (4, 4, 37, 700, 32),
                                            (8, 1, 511, 513, 32), (3, 1, 5, 90, 24)])
def test_attention_kernel_vs_softmax(Hq, Hkv, lo, hi, D, dtype):
    """split-K chunks (up to 256 rows) merged by log-sum-exp vs a plain fp64 softmax over the
    stored (fp32, fp16 or bf16) rows; D = 24 exercises the vector loops' masked tail."""
    ext = decode_step.load()
    g = torch.Generator().manual_seed(0)
    cap = 768
    q = torch.randn(Hq * D, generator=g)
    k = torch.randn(1, Hkv, cap, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, cap, D, generator=g).to(dtype)
    out = ext.attention(q, k, v, lo, hi, 0.3).view(Hq, D)
    kk = k[0, :, lo:hi].double().repeat_interleave(Hq // Hkv, 0)           # (Hq, S, D)
    vv = v[0, :, lo:hi].double().repeat_interleave(Hq // Hkv, 0)
    p = torch.softmax(0.3 * torch.einsum("hd,hsd->hs", q.view(Hq, D).double(), kk), -1)
    ref = torch.einsum("hs,hsd->hd", p, vv)
    assert (out.double() - ref).abs().max() < 1e-5
