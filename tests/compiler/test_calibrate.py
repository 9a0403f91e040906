import torch

from mcomp.compiler import ir
from mcomp.compiler.calibrate import LayerwiseRunner
from tests.helpers import tiny_gm, tiny_spec


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(3)]


def test_layerwise_run_equals_full_forward():
    gm = tiny_gm(tiny_spec(n_layers=3))
    bs = batches()
    r = LayerwiseRunner(gm, bs)
    for i in range(r.n_layers):
        r.advance(i)
    for ids, out in zip(bs, r.finish()):
        pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        torch.testing.assert_close(out, gm(ids, pos), rtol=0, atol=0)


def test_observe_sees_linear_inputs_and_later_layers_see_transformed_ones():
    gm = tiny_gm(tiny_spec(n_layers=2))
    bs = batches()
    r = LayerwiseRunner(gm, bs)
    seen = {}

    def grab(node, args, out):
        if node.op == "call_module" and node.meta["mcomp"].role == "q_proj":
            seen.setdefault(node.meta["mcomp"].layer, []).append(args[0])

    r.observe(0, grab)
    assert len(seen[0]) == len(bs) and seen[0][0].shape == (2, 16, 64)
    # transform layer 0 (zero its MLP output) before advancing: layer 1 must see the effect
    with torch.no_grad():
        gm.get_submodule("layers.0.down_proj").weight.zero_()
    r.advance(0)
    r.observe(1, grab)
    ref = {}
    h = torch.nn.Module.register_forward_hook(
        gm.get_submodule("layers.1.q_proj"), lambda m, a, o: ref.setdefault("x", []).append(a[0]))
    for ids in bs:
        gm(ids, torch.arange(16).expand(2, -1))
    h.remove()
    for got, want in zip(seen[1], ref["x"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_out_of_order_use_is_rejected():
    r = LayerwiseRunner(tiny_gm(), batches())
    import pytest
    with pytest.raises(RuntimeError, match="runner is at layer 0"):
        r.advance(1)
    with pytest.raises(RuntimeError, match="finish"):
        r.finish()
