"""The kept-channel kernels against the per-head oracle, and their traces at other batches."""

from __future__ import annotations

import pytest
import torch

import dgc
from dgc.layers import gathered as G
from dgc.layers.dgc_kernels import DgcKernels
from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.saliency import deactivate_bottom_k
from tests.dgc.helpers import oracle_forward


def test_select_channels_equals_bottom_k_zeroing_with_ties():
    # Head 0: ties at the threshold (both 0.5s) and exact zeros; head 1: distinct values.
    sal = torch.tensor([[[0.0, 0.5, 0.0, 0.5, 0.9, 0.75], [0.1, 0.6, 0.2, 0.3, 0.5, 0.4]]])
    for n in range(1, 6):
        index, scale = G.select_channels(sal, n)
        assert index.shape == scale.shape == (1, 2, 6 - n)
        dense = torch.zeros_like(sal).scatter(-1, index, scale)
        assert torch.equal(dense, deactivate_bottom_k(sal, n)), n


def test_select_channels_passes_gradient_to_kept_saliencies_only():
    sal = torch.tensor([[[0.1, 0.6, 0.2, 0.3]]], requires_grad=True)
    _, scale = G.select_channels(sal, 2)
    scale.sum().backward()
    assert sal.grad.tolist() == [[[0.0, 1.0, 0.0, 1.0]]]


def _layer(cin, cout, k, stride, heads, gate, seed=0):
    torch.manual_seed(seed)
    pad = k // 2
    layer = DynamicGroupConv2d(cin, cout, k, stride, pad, heads=heads, gate_factor=gate).eval()
    layer.set_inactive(layer.target_inactive)
    with torch.no_grad():  # non-trivial BN, so that the gate sees varied inputs
        layer.norm.running_mean.uniform_(-0.5, 0.5)
        layer.norm.running_var.uniform_(0.5, 2.0)
    return layer


SHAPES = [  # (C, O, k, stride, heads, gate, H)
    (16, 8, 3, 1, 2, 0.25, 6),
    (16, 16, 3, 2, 4, 0.25, 7),  # stride 2, odd size
    (12, 8, 3, 1, 4, 0.5, 5),
    (16, 8, 1, 1, 2, 0.25, 6),
    (16, 16, 1, 2, 4, 0.25, 6),  # strided 1x1 (a ResNet downsample)
]


@pytest.mark.parametrize("cin,cout,k,stride,heads,gate,size", SHAPES)
def test_every_eval_kernel_equals_the_per_head_oracle(cin, cout, k, stride, heads, gate, size):
    layer = _layer(cin, cout, k, stride, heads, gate)
    x = torch.randn(3, cin, size, size)
    names = ["bmm", "masked"] if k == 1 else ["fold", "unfold", "masked"]
    with torch.no_grad():
        expected, _ = oracle_forward(layer, x)
        for name in names:
            layer.kernels = DgcKernels(prefer=name)
            torch.testing.assert_close(layer(x), expected, msg=name)
            assert layer.kernels.last == name


@pytest.mark.parametrize("prefer", ["fold", "unfold", "masked"])
def test_network_traced_at_batch_1_runs_at_other_batches(prefer):
    # search export traces at batch 1 (model_portable.ts: torch kernels); the kernels fold
    # the batch into conv groups and row offsets, which a plain trace would freeze at 1.
    torch.manual_seed(0)
    model = dgc.create_model("dyresnet8", num_classes=5, in_chans=1, gate_factor=0.25).eval()
    dgc.set_progress(model, 1.0)
    for layer in dgc.dgc_layers(model):
        layer.kernels = DgcKernels(prefer=prefer)
        layer.ship_op = False
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, 1, 12, 12), check_trace=False)
        for batch in (1, 3, 8):
            x = torch.randn(batch, 1, 12, 12)
            torch.testing.assert_close(traced(x), model(x))


def test_eval_weight_layout_follows_weight_updates():
    layer = _layer(16, 8, 3, 1, 2, 0.25)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2.0)  # an optimizer step or load_state_dict writes in place
        expected, _ = oracle_forward(layer, x)
        torch.testing.assert_close(layer(x), expected)
        layer.load_state_dict(_layer(16, 8, 3, 1, 2, 0.25, seed=1).state_dict())
        expected, _ = oracle_forward(layer, x)
        torch.testing.assert_close(layer(x), expected)
    assert "eval_rows" not in layer.state_dict()  # a cache, never a checkpoint entry


def test_eval_under_bf16_autocast_matches_float32():
    layer = _layer(16, 16, 3, 1, 4, 0.25)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def _exported(model: torch.nn.Module) -> torch.export.ExportedProgram:
    example = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        model(example)
    batch = torch.export.Dim("batch")
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _pruned_eval_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = dgc.create_model("dyresnet8", num_classes=5, in_chans=1, gate_factor=0.25).eval()
    dgc.set_progress(model, 1.0)
    return model


def _assert_serves_other_batches(program: torch.export.ExportedProgram, model) -> None:
    with torch.no_grad():
        for size in (1, 3):
            x = torch.randn(size, 1, 12, 12)
            # Eager eval times its kernels anew at each batch size and may pick another of the
            # equivalent kernels than the program: equal up to float rounding.
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)


def test_torch_export_with_grad_enabled_records_one_dgc_operator_per_layer():
    # MLflow logs PyTorch models with torch.export (pt2) and grad enabled: an eval model must
    # export its inference path, not the training path: each DGC layer as the operator that
    # runs its eager eval forward (dgc.layers.shipped), and the program must serve any batch.
    model = _pruned_eval_model()
    program = _exported(model)
    calls = [
        node
        for node in program.graph.nodes
        if node.op == "call_function" and "dynamic_group_conv_eval" in str(node.target)
    ]
    assert len(calls) == len(dgc.dgc_layers(model))
    _assert_serves_other_batches(program, model)


def test_torch_export_without_the_operator_ships_the_torch_kernels():
    model = _pruned_eval_model()
    for layer in dgc.dgc_layers(model):
        layer.ship_op = False
    program = _exported(model)
    buffers = program.graph_signature.inputs_to_buffers  # placeholder -> buffer name
    used = [
        buffers[node.name]
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in buffers and node.users
    ]
    assert any(name.endswith(("eval_rows", "eval_taps")) for name in used)
    assert "dynamic_group_conv_eval" not in program.graph_module.code
    _assert_serves_other_batches(program, model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cin,cout,k,stride,heads,gate,size", SHAPES)
def test_every_kernel_and_the_training_path_equal_the_oracle_on_cuda(
    cin, cout, k, stride, heads, gate, size
):
    # float32 maths: cuDNN's default TF32 rounds convolutions to ~1e-3, differently per layout.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        _check_on_cuda(cin, cout, k, stride, heads, gate, size)


def _check_on_cuda(cin, cout, k, stride, heads, gate, size):
    layer = _layer(cin, cout, k, stride, heads, gate).cuda()
    x = torch.randn(3, cin, size, size, device="cuda")
    with torch.no_grad():
        expected, _ = oracle_forward(layer, x)
        for name in ["bmm", "masked"] if k == 1 else ["fold", "unfold", "masked"]:
            layer.kernels = DgcKernels(prefer=name)
            torch.testing.assert_close(layer(x), expected, msg=name)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.isfinite(layer(x)).all()
    layer.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = _layer(cin, cout, k, stride, heads, gate).cuda().train()
    ref.load_state_dict(layer.state_dict())
    y, (y_ref, lasso) = layer(xa), oracle_forward(ref, xb)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().add(layer.last_saliency_loss).backward()
    (y_ref * g).sum().add(lasso).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
