"""prune_layers: removing a block whose contribution is zero is exact; targets are checked."""
from __future__ import annotations

import pytest
import torch

from mcomp.compiler import ir
from mcomp.compiler.context import CalibrationConfig, CompileContext
from mcomp.compiler.manager import PassManager
from mcomp.errors import ConfigError
from mcomp.prune.layers import PruneLayers, PruneLayersConfig, block_scores
from tests.helpers import tiny_gm, tiny_spec

IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
POS = torch.arange(24).expand(2, -1)


def small_ctx() -> CompileContext:
    g = torch.Generator().manual_seed(0)
    return CompileContext(calib_ids=torch.randint(3, 128, (2048,), generator=g),
                          probe_ids=torch.randint(3, 128, (2, 16), generator=g), bos_id=1,
                          config=CalibrationConfig(n_samples=8, seq_len=32))


def zero_block(gm, i):
    with torch.no_grad():
        gm.get_submodule(f"layers.{i}.o_proj").weight.zero_()
        gm.get_submodule(f"layers.{i}.down_proj").weight.zero_()


@pytest.mark.parametrize("iterative", [True, False])
def test_identity_blocks_are_removed_exactly(iterative):
    gm = tiny_gm(tiny_spec(n_layers=4))
    zero_block(gm, 1)
    zero_block(gm, 3)
    with torch.no_grad():
        ref = gm(IDS, POS)
    gm2, rep = PassManager([PruneLayers(PruneLayersConfig(n_layers=2, iterative=iterative))]
                           ).run(gm, small_ctx())
    st = rep.passes[0].stats
    assert st["removed_layers"] == [1, 3] and st["kept_layers"] == [0, 2]
    assert ir.get_spec(gm2).n_layers == 2
    assert st["non_embedding_params_after"] < st["non_embedding_params_before"]
    with torch.no_grad():
        torch.testing.assert_close(gm2(IDS, POS), ref, rtol=0, atol=1e-5)


def test_scores_are_zero_for_an_identity_block_and_exclusion_is_respected():
    gm = tiny_gm(tiny_spec(n_layers=3))
    zero_block(gm, 0)
    s = block_scores(gm, small_ctx().calibration_batches())
    assert s[0] < 1e-9 < min(s[1:])
    gm2, rep = PassManager([PruneLayers(PruneLayersConfig(n_layers=1, exclude_layers=(0,)))]
                           ).run(gm, small_ctx())
    assert 0 not in rep.passes[0].stats["removed_layers"]


def test_impossible_layer_targets():
    with pytest.raises(ConfigError, match="≥ 1"):
        PruneLayersConfig(n_layers=0)
    gm = tiny_gm(tiny_spec(n_layers=2))
    for cfg, match in ((PruneLayersConfig(n_layers=2), "at least one must stay"),
                       (PruneLayersConfig(n_layers=1, exclude_layers=(0, 1)), "excluded"),
                       (PruneLayersConfig(n_layers=1, exclude_layers=(5,)), "out of range")):
        with pytest.raises(ConfigError, match=match):
            PassManager([PruneLayers(cfg)]).run(gm, small_ctx())
