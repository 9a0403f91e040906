"""palu: calibrate Palu's low-rank K/V factors and give every layer a `palu` latent cache.

Palu (arXiv 2407.21118) per layer and group g of KV heads, for W = W_k and W = W_v separately:

1. Whitening (SVD-LLM, Palu §3.4): with the Gram matrix of the attention input over the
   calibration tokens, XᵀX = S Sᵀ (Cholesky), the SVD of W_g S = U Σ Vᵀ gives the rank-r
   factorization that minimizes the *output* error ‖X W_gᵀ − X W_rᵀ‖_F (not the weight error):

       W_r = B Aᵀ,   B = U_r Σ_r  (group_dim × r),   A = S⁻ᵀ V_r  (hidden × r)

   and the truncation costs exactly Σ_{i>r} σ_i² of output energy. With `latent="white"` the
   latent h = X A has identity covariance on the calibration tokens (Aᵀ XᵀX A = V_rᵀ V_r = I),
   every channel the same scale. A is scaled by √N (N calibration tokens) so latents are O(1)
   per token, B by 1/√N. With `latent="pca"` (the default for quantized latents) A = S⁻ᵀ V_r Σ_r, B = U_r:
   channel i of the latent is the i-th principal component of the projection output, as large
   as K/V themselves; why, in runtime/kv/palu.py ("Latent scaling").
2. Rank allocation (Palu §3.5 uses Fisher information per projection): the loss change of
   truncating projection u is modelled as ½·F_u·‖ΔXW_uᵀ‖², F_u the mean squared gradient of the
   LM loss w.r.t. u's output (empirical Fisher, one backward pass over `fisher_samples`
   calibration windows), ‖ΔXW_uᵀ‖² the whitened tail energy above. Ranks grow greedily, RANK_STEP
   channels per group at a time, by the largest F_u·(energy gained) per cache channel, until the
   model keeps (1 − ratio) of its K/V channels. The objective is separable and each unit's gains
   decrease (singular values are sorted), so this greedy is the exact optimum for equal costs.
   `allocation="uniform"` gives every projection the same rank (the ablation).
3. With quantized latents and `hadamard` (Palu §3.6), each group's latent is rotated by an
   orthonormal Hadamard matrix R folded into the factors (A R, B R): B Aᵀ is unchanged.

The factors become the layers' KV state tensors (runtime/kv/palu.py); no weight is rewritten,
so the no-cache forward still uses the full projections and the verifier's KV drift measures
what the latent cache costs.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..compiler import ir
from ..compiler.calibrate import LayerwiseRunner
from ..compiler.hadamard import hadamard
from ..compiler.passes import PassConfig, PassResult, register_pass
from ..compiler.spec import KVSpec
from ..errors import ConfigError
from ..runtime.kv import model_bytes_per_token, parse_kv
from ..runtime.kv.palu import RANK_STEP, PaluParams
from .assign_kv import CalibratedKVPass, check_input_is_kv_input

log = logging.getLogger("mcomp.passes")


@dataclass(frozen=True)
class PaluConfig(PassConfig):
    KIND: ClassVar[str] = "palu"   # the KV kind this pass sets (cskv reuses the pass)
    kv: str = "palu:0.5"           # the `--kv palu:...` shorthand
    fisher_samples: int = 8        # calibration windows of the Fisher backward pass
    damp: float = 1e-6             # Cholesky damping, relative to the Gram's mean diagonal
    version: int = 1

    def __post_init__(self):
        spec = parse_kv(self.kv).spec
        if spec.kind != self.KIND:
            raise ConfigError(f"{self.KIND} pass: kv '{self.kv}' is not a {self.KIND} shorthand")
        if type(self.fisher_samples) is not int or self.fisher_samples < 1:
            raise ConfigError(f"palu pass: fisher_samples must be a positive integer, got "
                              f"{self.fisher_samples!r}")

    def params(self) -> PaluParams:
        return parse_kv(self.kv).spec.params


def _kv_rows(layer) -> tuple[slice, slice]:
    return slice(0, layer.kv_dim), slice(layer.kv_dim, 2 * layer.kv_dim)


def _projection_nodes(gm, i):
    return [n for n in ir.nodes_by_role(gm, "k_proj", "v_proj", "qkv_proj")
            if n.meta["mcomp"].layer == i]


def gram_matrices(gm, ctx) -> tuple[list[torch.Tensor], int]:
    """(per layer Σ_t x_tᵀ x_t (float64) of the attention input over the calibration windows,
    the number of tokens t)."""
    spec = ir.get_spec(gm)
    runner = LayerwiseRunner(gm, ctx.calibration_batches())
    grams: list[torch.Tensor] = []
    for i in range(spec.n_layers):
        src = _projection_nodes(gm, i)[0]
        acc = {"g": torch.zeros(spec.hidden_size, spec.hidden_size, dtype=torch.float64), "n": 0}

        def collect(node, args, out, src=src, acc=acc):
            if node is src:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                acc["g"] += x.T @ x
                acc["n"] += x.shape[0]
        runner.advance(i, collect)
        grams.append(acc["g"])
    return grams, acc["n"]


def output_fisher(gm, ctx, n_windows: int) -> list[tuple[float, float]]:
    """Per layer (F_k, F_v): the mean squared gradient of the next-token loss w.r.t. the K and
    V projection outputs (pre-norm, pre-RoPE), over `n_windows` calibration windows."""
    spec = ir.get_spec(gm)
    sums = [[0.0, 0.0] for _ in spec.layers]
    counts = [[0, 0] for _ in spec.layers]
    leaves: list = []
    hooks = []
    for i, ls in enumerate(spec.layers):
        for node in _projection_nodes(gm, i):
            role = node.meta["mcomp"].role
            mod = gm.get_submodule(node.target)

            def hook(mod, inp, out, i=i, role=role, ls=ls):
                leaf = out.detach().requires_grad_(True)
                leaves.append((i, role, ls, leaf))
                return leaf
            hooks.append(mod.register_forward_hook(hook))
    windows = torch.cat(list(ctx.calibration_batches()))[:n_windows]
    frozen = [p for p in gm.parameters() if p.requires_grad]
    for p in frozen:          # only the projection outputs need gradients, no weight does
        p.requires_grad_(False)
    from ..runtime.kernels import reference_mode
    try:
        # the reference linear (dequantize + matmul) is differentiable in its input; the fast
        # int kernels are not
        with torch.enable_grad(), reference_mode():
            for ids in windows.split(2):
                leaves.clear()
                pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
                logits = gm(ids, pos)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                       reduction="sum")
                loss.backward()
                for i, role, ls, leaf in leaves:
                    g2 = leaf.grad.double().pow(2)
                    if role == "qkv_proj":
                        q = ls.q_dim
                        parts = {0: g2[..., q:q + ls.kv_dim], 1: g2[..., q + ls.kv_dim:]}
                    else:
                        parts = {0 if role == "k_proj" else 1: g2}
                    for j, g in parts.items():
                        sums[i][j] += float(g.sum())
                        counts[i][j] += g.numel()
                del logits, loss
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    return [(s[0] / max(c[0], 1), s[1] / max(c[1], 1)) for s, c in zip(sums, counts)]


def whitened_svd(w: torch.Tensor, chol: torch.Tensor):
    """(U, σ, A_full) of w (rows × hidden) whitened by the Cholesky factor of XᵀX: w·chol =
    U diag(σ) Vᵀ, A_full = chol⁻ᵀ V (hidden × rows)."""
    u, s, vh = torch.linalg.svd(w.double() @ chol, full_matrices=False)
    a = torch.linalg.solve_triangular(chol.T, vh.T, upper=True)
    return u, s, a


def _cholesky(gram: torch.Tensor, damp: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    scale = float(gram.diagonal().mean()) or 1.0
    for k in range(8):
        L, info = torch.linalg.cholesky_ex(gram + damp * 10 ** k * scale * eye)
        if int(info) == 0:
            return L
    raise ConfigError("palu: the attention input's Gram matrix is not positive definite even "
                      "with damping (calibration text too short or degenerate)")


def allocate(energies: dict, fisher: dict, costs: dict, max_steps: dict, budget: int,
             uniform_steps: dict | None) -> dict:
    """Steps (of RANK_STEP channels per group) per unit u = (layer, 'k'|'v'): greedy by
    fisher[u]·(energy of the step) / costs[u] under Σ steps·costs ≤ budget, one step minimum.
    energies[u]: per-step energy, decreasing. uniform_steps: return it (after a budget check)."""
    floor = sum(costs.values())
    if floor > budget:
        raise ConfigError(f"palu: the ratio keeps {budget} K/V channels, fewer than the minimum "
                          f"of {RANK_STEP} per group of every projection ({floor}); lower the ratio")
    if uniform_steps is not None:
        return uniform_steps
    steps = {u: 1 for u in energies}
    used = floor
    heap = [(-fisher[u] * energies[u][1] / costs[u], u) for u in energies if max_steps[u] > 1]
    heapq.heapify(heap)
    while heap:
        gain, u = heapq.heappop(heap)
        if used + costs[u] > budget:
            continue              # a cheaper unit may still fit
        steps[u] += 1
        used += costs[u]
        if steps[u] < max_steps[u]:
            heapq.heappush(heap, (-fisher[u] * energies[u][steps[u]] / costs[u], u))
    return steps


@register_pass
class Palu(CalibratedKVPass):
    name = "palu"
    Config = PaluConfig
    version = 1

    def run(self, gm, ctx) -> PassResult:
        self.require_ctx(ctx)
        cfg = self.config
        tmpl = cfg.params()
        spec = ir.get_spec(gm)
        for i, ls in enumerate(spec.layers):
            check_input_is_kv_input(gm, i, cfg.KIND)
            dataclasses.replace(tmpl, k_rank=0, v_rank=0).check_layer(ls)
            gd = tmpl.group_dim(ls)
            if gd % RANK_STEP:
                raise ConfigError(f"{cfg.KIND}: layer {i}: group width {gd} is not a multiple of "
                                  f"{RANK_STEP}")
        before = model_bytes_per_token(spec)
        grams, n_tok = gram_matrices(gm, ctx)
        fisher = (output_fisher(gm, ctx, cfg.fisher_samples) if tmpl.allocation == "fisher"
                  else [(1.0, 1.0)] * spec.n_layers)

        # whitened SVD per (layer, k|v, group)
        from ..runtime.kv.xquant import kv_weights
        from ..runtime.kvcache import KVBinding

        svds, energies, fis, costs, max_steps, uniform = {}, {}, {}, {}, {}, {}
        for i, ls in enumerate(spec.layers):
            wk, wv, _, _ = kv_weights(KVBinding(gm, i), ls)
            chol = _cholesky(grams[i], cfg.damp)
            n, hpg = tmpl.groups(ls)
            gd = tmpl.group_dim(ls)
            for j, (side, w) in enumerate((("k", wk), ("v", wv))):
                u = (i, side)
                per_group = [whitened_svd(w[g * gd:(g + 1) * gd], chol) for g in range(n)]
                svds[u] = per_group
                e = sum(s.pow(2) for _, s, _ in per_group)                # (gd,) over groups
                energies[u] = e.view(-1, RANK_STEP).sum(1).tolist()
                fis[u] = fisher[i][j]
                costs[u] = n * RANK_STEP
                max_steps[u] = gd // RANK_STEP
                uniform[u] = max(1, min(max_steps[u], round((1 - tmpl.ratio) * gd / RANK_STEP)))
        budget = round((1 - tmpl.ratio) * sum(2 * ls.kv_dim for ls in spec.layers))
        steps = allocate(energies, fis, costs, max_steps, budget,
                         uniform if tmpl.allocation == "uniform" else None)

        ranks, kept = [], 0
        root_n = math.sqrt(max(n_tok, 1))
        scaling = tmpl.latent_scaling()
        for i, ls in enumerate(spec.layers):
            rk, rv = steps[(i, "k")] * RANK_STEP, steps[(i, "v")] * RANK_STEP
            state = {}
            for side, r, name in (("k", rk, "Bk"), ("v", rv, "Bv")):
                As, Bs = [], []
                for uu, s, a in svds[(i, side)]:
                    # latent channel scale c: pca carries σ_i²/N per token, white unit variance
                    c = s[:r] if scaling == "pca" else root_n
                    A, B = a[:, :r] * c, uu[:, :r] * (s[:r] / c)
                    if tmpl.bits and tmpl.hadamard:
                        R = hadamard(r, torch.float64)
                        A, B = A @ R, B @ R
                    As.append(A)
                    Bs.append(B)
                state[name] = torch.stack(Bs).float()
                state["A" + side] = torch.cat(As, 1)
            state["A"] = torch.cat([state.pop("Ak"), state.pop("Av")], 1).float()
            params = dataclasses.replace(tmpl, k_rank=rk, v_rank=rv)
            ir.set_layer_kv(gm, i, KVSpec(cfg.KIND, params), state)
            ranks.append([rk, rv])
            kept += sum(params.latent_split(ls))
        after = model_bytes_per_token(ir.get_spec(gm))
        total = sum(2 * ls.kv_dim for ls in spec.layers)
        stats = {"kv": tmpl.label(), "ranks_kv": ranks, "channels_kept": kept,
                 "channels_total": total, "kept_fraction": round(kept / total, 4),
                 "allocation": tmpl.allocation, "latent": scaling,
                 "calibration_tokens": n_tok,
                 "kv_bytes_per_token_before": before, "kv_bytes_per_token_after": after}
        log.info("%s: kept %d of %d K/V channels; ranks %s", cfg.KIND, kept, total, ranks)
        return PassResult(gm, stats)
