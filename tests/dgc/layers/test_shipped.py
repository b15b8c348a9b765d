"""dgc.layers.shipped: the operator that traced and exported DGC layers record runs the eager
eval forward, equals the per-head oracle, follows parameter updates and serves any batch."""

from __future__ import annotations

import pytest
import torch

from dgc.layers import shipped
from dgc.layers.dgc_kernels import DgcKernels
from tests.dgc.helpers import SHAPES
from tests.dgc.helpers import make_layer
from tests.dgc.helpers import oracle_forward


def _ops_in(traced: torch.jit.ScriptModule) -> int:
    return str(traced.inlined_graph).count("dgc::dynamic_group_conv_eval")


@pytest.mark.parametrize("cin,cout,k,stride,heads,gate,h,w", SHAPES)
@pytest.mark.parametrize("options", [{}, {"norm": False}, {"saliency": "mask"}])
def test_traced_and_exported_layers_equal_eager_eval(
    cin, cout, k, stride, heads, gate, h, w, options
):
    layer = make_layer(cin, cout, k, stride, heads, gate, **options)
    x = torch.randn(3, cin, h, w)
    with torch.no_grad():
        if options:  # the oracle has the paper's BN-ReLU and saliency scaling only
            layer.kernels = DgcKernels(prefer="fold")  # equal to the oracle (test_gathered)
            expected = layer(x)
            layer.kernels = DgcKernels()
        else:
            expected, _ = oracle_forward(layer, x)
        traced = torch.jit.trace(layer, x[:1], check_trace=False)
    assert _ops_in(traced) == 1
    batch = torch.export.Dim("batch")
    program = torch.export.export(layer, (x[:2],), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-5)


def test_a_traced_layer_follows_in_place_parameter_updates():
    layer = make_layer(16, 16, 3, 1, 4, 0.25)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)
        traced(x)  # plans built for these tensors
        layer.weight.mul_(2.0)  # the trace shares the layer's tensors
        layer.gate.fc2_bias.add_(0.5)
        layer.norm.running_mean.add_(0.1)
        expected, _ = oracle_forward(layer, x)
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-5)


def test_hooks_and_autocast_keep_the_torch_operators():
    # The operator would bypass a hook on the layer's norm or gate, and runs float32 only.
    layer = make_layer(16, 16, 3, 1, 4, 0.25)
    seen = []
    layer.gate.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)
    assert _ops_in(traced) == 0 and seen
    plain = make_layer(16, 16, 3, 1, 4, 0.25)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        traced = torch.jit.trace(plain, x, check_trace=False)
    assert _ops_in(traced) == 0


def test_the_layer_cache_is_bounded_and_keyed_by_storage():
    cache = shipped._Layers(2, shipped._layer_around)
    layers = [make_layer(8, 8, 3, 1, 2, 0.25, seed=s) for s in range(3)]
    built = []
    for layer in layers:
        bn = layer.norm
        tensors = (layer.weight, layer.gate.fc1_weight, layer.gate.fc2_weight,
                   layer.gate.fc2_bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)  # fmt: skip
        built.append(cache.get(tensors, (layer.n_inactive, 1, 1, 1, False, bn.eps)))
        assert cache.get(tensors, (layer.n_inactive, 1, 1, 1, False, bn.eps)) is built[-1]
        assert built[-1].weight is layer.weight  # the tensors themselves, not copies
    assert len(cache._layers) == 2


def test_a_program_runs_under_inference_mode_and_with_inference_tensors():
    layer = make_layer(16, 16, 3, 1, 4, 0.25)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = layer(x)
        traced = torch.jit.trace(layer, x, check_trace=False)
    with torch.inference_mode():  # first call here: the operator builds its layer here
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-5)
        inference = make_layer(16, 16, 3, 1, 4, 0.25)  # parameters without version counters
        torch.testing.assert_close(inference(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inference(x), expected, rtol=1e-4, atol=1e-5)
