"""Cache-aware verification (compiler/verify.verify_kv): a KV pass is run through real caches
(prefill, then decode past the lossy window) and compared with the no-cache forward. Mutation
tests prove it can fail: broken caches must be caught, not reported as good numbers."""
from __future__ import annotations

import dataclasses

import pytest

from mcomp.compiler.manager import PassManager, VerifyConfig
from mcomp.errors import PassError
from mcomp.passes.assign_kv import kv_passes
from mcomp.runtime.kv.dense import DenseKVCache
from mcomp.runtime.kv.kivi import KIVICache
from tests.helpers import tiny_ctx, tiny_gm, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")

KV = "kivi2:k4:g4:r8:s1"          # K 4-bit, V 2-bit: a V stored at K's width is visible in bytes


def run(kv=KV, verify=None):
    gm = tiny_gm(tiny_spec(n_layers=2))
    return PassManager(kv_passes(kv), verify=verify).run(gm, tiny_ctx())


def test_kivi_pass_is_verified_through_its_caches():
    _, rep = run()
    kd = rep.passes[-1].kv_drift
    assert kd["prefill"] == 16 and kd["decode_steps"] == 8 + 2 * 4
    assert kd["bytes_ok"] and kd["kv_bytes"] > 0
    assert 0 < kd["kld"] < 1 and kd["top1"] > 0.5          # lossy, and seen
    assert rep.passes[-1].drift["kld"] == pytest.approx(0, abs=1e-9)   # the no-cache probe


def test_dense_pass_is_exact_through_its_caches():
    _, rep = run("dense")
    assert rep.passes[-1].kv_drift is None                 # dense → dense: nothing changed
    gm = tiny_gm(tiny_spec(n_layers=2))
    gm, _ = PassManager(kv_passes(KV)).run(gm, tiny_ctx())
    _, rep = PassManager(kv_passes("dense")).run(gm, tiny_ctx())
    kd = rep.passes[-1].kv_drift
    assert kd["max_abs_logit"] < 1e-4 and kd["top1"] == 1.0


def test_mutation_v_bits_follow_k_bits_is_caught(monkeypatch):
    init = KIVICache.__init__

    def wrong(self, layer, batch, binding=None):
        init(self, layer, batch, binding)
        self.kv = dataclasses.replace(self.kv, v_bits=self.kv.k_bits)   # silently 4-bit V

    monkeypatch.setattr(KIVICache, "__init__", wrong)
    with pytest.raises(PassError, match=r"assign_kv.*layer 0: its 'kivi' cache .* holds \d+ bytes"):
        run()


def test_mutation_residual_never_flushed_is_caught(monkeypatch):
    init = KIVICache.__init__

    def never_flush(self, layer, batch, binding=None):
        init(self, layer, batch, binding)
        self.R = 10 ** 9              # the fp window swallows everything: logits look perfect

    monkeypatch.setattr(KIVICache, "__init__", never_flush)
    with pytest.raises(PassError, match="holds .* bytes .* accounting says"):
        run()


def test_mutation_lossy_dense_cache_is_caught(monkeypatch):
    append = DenseKVCache.append

    def lossy(self, k, v):
        return append(self, k, v.bfloat16().float())      # claims fp32, rounds V

    gm = tiny_gm(tiny_spec(n_layers=2))
    gm, _ = PassManager(kv_passes(KV)).run(gm, tiny_ctx())
    monkeypatch.setattr(DenseKVCache, "append", lossy)
    with pytest.raises(PassError, match="lossless KV caches changed the logits"):
        PassManager(kv_passes("dense")).run(gm, tiny_ctx())


def test_can_be_turned_off():
    _, rep = run(verify=VerifyConfig(kv=False))
    assert rep.passes[-1].kv_drift is None
    _, rep = run(verify=VerifyConfig(enabled=False))
    assert rep.passes[-1].kv_drift is None
