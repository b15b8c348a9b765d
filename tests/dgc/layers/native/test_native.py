"""The native direct-convolution kernel and the fused inference forward against the per-head
oracle and the torch kernels; its build, its fallback and its absence from traces."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dgc
from dgc.layers import gathered as G
from dgc.layers import native
from dgc.layers.dgc_kernels import DgcKernels
from tests.dgc.helpers import SHAPES
from tests.dgc.helpers import make_layer
from tests.dgc.helpers import needs_library
from tests.dgc.helpers import oracle_forward
from tests.helpers import python


@needs_library
@pytest.mark.parametrize("cin,cout,k,stride,heads,gate,h,w", SHAPES)
def test_direct_kernel_and_fused_forward_equal_the_oracle(
    cin, cout, k, stride, heads, gate, h, w, native_calls
):
    layer = make_layer(cin, cout, k, stride, heads, gate)
    layer.kernels = DgcKernels(prefer="direct")
    x = torch.randn(3, cin, h, w)
    with torch.no_grad():
        expected, _ = oracle_forward(layer, x)
        fused = layer(x)  # a settled "direct" choice runs the fused native forward
        assert layer.kernels.last == "direct" and native_calls["fused_eval"] == 1
        n = layer.target_inactive
        index, scale = G.select_channels(layer.gate(torch.relu(layer.norm(x)).mean((2, 3))), n)
        args = (layer.stride, layer.padding, 1)
        rows, shape = G.weight_rows(layer.weight, heads), (cout, k)
        alone = native.direct_conv(torch.relu(layer.norm(x)), index, scale, rows, shape, args)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(alone, expected)


@needs_library
def test_direct_kernel_equals_the_fold_kernel_on_gathered_inputs():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 24, 9, 9).relu(), torch.randn(12, 24, 3, 3)
    index, scale = G.select_channels(torch.rand(2, 4, 24), 18)  # (B, h, K) each
    rows = G.weight_rows(weight, 4)
    for stride in (1, 2):
        expected = G.fold_conv(x, index, scale, rows, 3, (stride, 1, 1))
        rows = G.weight_rows(weight, 4)
        out = native.direct_conv(x, index, scale, rows, (12, 3), (stride, 1, 1))
        torch.testing.assert_close(out, expected)


@needs_library
@pytest.mark.parametrize(
    "cin,cout,k,stride,heads,gate,h,w",
    # strided 1x1: convolved at stride 1 on every other pixel (odd and even sizes)
    SHAPES[:3] + SHAPES[5:8] + [(16, 16, 1, 2, 4, 0.25, 7, 7)],
)
def test_training_forward_with_the_direct_kernel_has_the_oracle_gradients(
    cin, cout, k, stride, heads, gate, h, w, native_calls
):
    layer = make_layer(cin, cout, k, stride, heads, gate).train()
    layer.kernels = DgcKernels(prefer="direct")
    ref = make_layer(cin, cout, k, stride, heads, gate).train()
    x = torch.randn(3, cin, h, w)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = layer(x1)
    assert layer.kernels.last == "direct"
    assert native_calls["direct_conv"] >= 1 and native_calls["bn_relu_train"] == 1
    y2, lasso = oracle_forward(ref, x2)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y1)
    (y1 * g).sum().add(layer.last_saliency_loss).backward()
    (y2 * g).sum().add(lasso).backward()
    assert native_calls["wgrad_weight"] >= 1 and native_calls["bn_relu_train_backward"] == 1
    assert native_calls["igrad_fused"] + native_calls["igrad_planes"] >= 1
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for (name, p1), p2 in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-4, msg=name)


BACKWARD_SHAPES = [s for s in SHAPES if s[2] in (1, 3)] + [  # the native backward's kernels
    (16, 20, 1, 1, 2, 0.25, 5, 7),  # 1x1, O/h = 10: a block of 8 outputs and 2 single ones
    (16, 32, 1, 2, 2, 0.25, 9, 9),  # strided 1x1, two blocks of 8
    # Rows of whole vectors (W % 8 == 0): the 3x3 weight gradient reads x in place, kept
    # channels in blocks of 3: 8 kept = 3 + 3 + 2, 5 = 3 + 2, 4 = 2 + 2, 1.
    (16, 16, 3, 1, 4, 0.5, 8, 8),
    (20, 8, 3, 1, 2, 0.25, 5, 16),
    (16, 8, 3, 1, 2, 0.25, 3, 8),
    (8, 8, 3, 1, 4, 0.125, 4, 8),
    # Strided 3x3, even and uneven sizes: the fused input gradient by phases.
    (16, 16, 3, 2, 4, 0.5, 8, 8),
    (8, 12, 3, 2, 2, 0.5, 16, 10),
]


@pytest.fixture
def two_threads():
    """torch.get_num_threads() == 2, as on this project's CI machine, restored afterwards:
    which native backward runs depends on how a batch splits over the threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _backward_args(cin, cout, k, stride, heads, gate, h, w, batch):
    from dgc.layers import gathered as G

    torch.manual_seed(0)
    x, weight = torch.randn(batch, cin, h, w), torch.randn(cout, cin, k, k)
    kept = round(gate * cin)
    index = torch.stack([torch.randperm(cin)[:kept] for _ in range(batch * heads)])
    index, scale = index.view(batch, heads, kept), torch.rand(batch, heads, kept)
    scale[0, 0, 0] = 0.0  # a pruned tie: its plane is zeros
    ho, wo = ((n + 2 * (k // 2) - k) // stride + 1 for n in (h, w))
    grad = torch.randn(batch, cout, ho, wo)
    rows = G.weight_rows(weight, heads)
    return x, scale, rows, index, grad, (stride, k // 2, 1), weight.shape


@needs_library
@pytest.mark.parametrize("batch", [3, 4])  # 4 on two threads: the fused input gradient
@pytest.mark.parametrize("cin,cout,k,stride,heads,gate,h,w", BACKWARD_SHAPES)
def test_native_backward_equals_the_grouped_conv_backward(
    cin, cout, k, stride, heads, gate, h, w, batch, two_threads
):
    from dgc.layers.dgc_autograd import gathered_backward

    args = _backward_args(cin, cout, k, stride, heads, gate, h, w, batch)
    torch_grads, native_grads = gathered_backward(*args, False), gathered_backward(*args, True)
    for name, a, b in zip(("x", "scale", "weight"), torch_grads, native_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)


@needs_library
def test_native_selection_keeps_what_the_top_k_keeps_and_passes_the_same_gradient():
    torch.manual_seed(0)
    sal = torch.rand(5, 3, 16).round(decimals=1)  # many ties, some at the threshold
    sal[0, 0] = 0.5  # a head of equal saliencies: every kept one is a tie (scale 0)
    a, b = sal.clone().requires_grad_(), sal.clone().requires_grad_()
    (i1, s1), (i2, s2) = G.select_channels(a, 6), native.select_channels(b, 6)
    # per head, the same channels alive with the same scales (tied slots: any channel, 0)
    for h1, c1, h2, c2 in zip(i1.view(-1, 10), s1.view(-1, 10), i2.view(-1, 10), s2.view(-1, 10)):
        alive1 = {(int(i), float(v)) for i, v in zip(h1, c1) if v > 0}
        alive2 = {(int(i), float(v)) for i, v in zip(h2, c2) if v > 0}
        assert alive1 == alive2
    assert (s2[0, 0] == 0).all()
    weights = torch.randn(5, 3, 16)
    (s1 * weights.gather(-1, i1)).sum().backward()
    (s2 * weights.gather(-1, i2)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@needs_library
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("w", [8, 9])  # rows of whole vectors (x read in place), and not
def test_native_weight_gradient_equals_the_grouped_conv_backward_at_any_padding(padding, w):
    from dgc.layers.dgc_autograd import gathered_backward

    x, scale, rows, index, grad, _, shape = _backward_args(12, 8, 3, 1, 2, 0.5, 6, w, 3)
    grad = torch.randn(3, 8, 6 + 2 * padding - 2, w + 2 * padding - 2)
    args = (x, scale, rows, index, grad, (1, padding, 1), shape)
    torch_grads, native_grads = gathered_backward(*args, False), gathered_backward(*args, True)
    for name, a, b in zip(("x", "scale", "weight"), torch_grads, native_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)


@needs_library
@pytest.mark.parametrize("cin,cout,k,stride,heads,gate,h,w", BACKWARD_SHAPES)
def test_weight_gradient_summed_over_threads_equals_the_grouped_conv_backward(
    cin, cout, k, stride, heads, gate, h, w, two_threads
):
    """Batch 5 on two threads: tasks split unevenly, each thread's accumulator then added."""
    from dgc.layers.dgc_autograd import gathered_backward

    args = _backward_args(cin, cout, k, stride, heads, gate, h, w, 5)
    x, scale, rows, index, grad, conv, shape = args
    expected = gathered_backward(*args, False)[2]  # (O, C, k, k), torch's grouped backward
    grad_rows = native.wgrad_weight(x, index, scale, grad, (cout, k), conv)  # (h*C, O/h*k*k)
    got = grad_rows.view(heads, cin, cout // heads, k * k).transpose(1, 2).reshape(shape)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_library
@pytest.mark.parametrize("batch", [1, 3, 4])  # any batch: balance only picks the call
@pytest.mark.parametrize("cin,cout,k,stride,heads,gate,h,w", [s for s in SHAPES if s[3] == 1])
def test_fused_input_gradient_equals_the_plane_gradients_summed(
    cin, cout, k, stride, heads, gate, h, w, batch
):
    x, scale, rows, index, grad, conv, _ = _backward_args(cin, cout, k, 1, heads, gate, h, w, batch)
    grad_x, grad_scale = native.igrad_fused(grad, x, index, scale, rows, k, conv[1])
    g = native.igrad_planes(grad, index, rows, cin, k, conv[1])  # (B*h*K, HW)
    x_rows = (index + torch.arange(batch).view(-1, 1, 1) * cin).reshape(-1)
    expected_x = torch.zeros(batch * cin, h * w).index_add_(0, x_rows, g * scale.reshape(-1, 1))
    expected_scale = (g * x.reshape(batch * cin, -1)[x_rows]).sum(-1).view_as(scale)
    torch.testing.assert_close(grad_x, expected_x.view_as(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_scale, expected_scale, rtol=1e-4, atol=1e-4)


@needs_library
def test_a_training_layer_times_the_native_backward_once_per_shape():
    layer = make_layer(16, 16, 3, 1, 4, 0.25).train()
    layer.kernels.patience = 0  # timed at the first call (the default waits for a recurrence)
    x = torch.randn(2, 16, 8, 8)
    layer(x).sum().backward()
    keys = [key for key in layer.kernels.chosen if key[0] == "backward"]
    assert len(keys) == 1 and layer.kernels.chosen[keys[0]] in ("fold", "direct")
    assert set(layer.kernels.times[keys[0]]) == {"fold", "direct"}
    layer(x).sum().backward()  # settled: not timed again
    assert [key for key in layer.kernels.chosen if key[0] == "backward"] == keys


@needs_library
def test_fused_forward_drops_ties_at_the_threshold(native_calls):
    # A negative generator bias makes many saliencies exactly 0, tied at the threshold: all of
    # them go, and the kept slots they leave contribute nothing.
    layer = make_layer(16, 16, 3, 1, 4, 0.5)
    with torch.no_grad():
        layer.gate.fc2_bias.fill_(-0.3)
    layer.kernels = DgcKernels(prefer="direct")
    x = torch.randn(4, 16, 6, 6)
    with torch.no_grad():
        sal = layer.gate(torch.relu(layer.norm(x)).mean((2, 3)))
        assert (sal == 0).sum(-1).max() > layer.target_inactive  # ties exist
        expected, _ = oracle_forward(layer, x)
        layer(x)
        torch.testing.assert_close(layer(x), expected)
    assert native_calls["fused_eval"] == 2  # pinned: both calls


@needs_library
@pytest.mark.parametrize("saliency", ["scale", "mask"])
@pytest.mark.parametrize("k", [1, 3])
def test_a_layer_that_keeps_every_channel_runs_every_kernel_as_the_masked_one(
    saliency, k, native_calls
):
    # n = 0 (a gate factor of 1): the gathered and native kernels keep all C channels; the
    # zero saliencies (a negative generator bias) contribute nothing, in mask mode too.
    layer = make_layer(16, 16, k, 1, 4, 1.0, saliency=saliency)
    with torch.no_grad():
        layer.gate.fc2_bias.fill_(-0.3)
    assert layer.target_inactive == 0
    x = torch.randn(3, 16, 8, 8)
    kernels = ["masked", "bmm" if k == 1 else "fold", "direct"] + ([] if k == 1 else ["unfold"])
    outs = {}
    with torch.no_grad():
        sal = layer.gate(torch.relu(layer.norm(x)).mean((2, 3)))
        assert (sal == 0).any() and (sal > 0).any()
        for name in kernels:
            layer.kernels = DgcKernels(prefer=name)
            outs[name] = (layer(x), layer(x))  # the first settles the choice, the second
            assert layer.kernels.last == name  # runs it (fused, for "direct")
        assert native_calls["fused_eval"] == 2  # pinned: both calls of "direct"
        if saliency == "scale":
            torch.testing.assert_close(outs["masked"][0], oracle_forward(layer, x)[0])
    for name in kernels:
        for out in outs[name]:
            torch.testing.assert_close(out, outs["masked"][0])


@needs_library
@pytest.mark.parametrize("shape", [(1, 128, 32, 32), (3, 5, 7, 9), (2, 3, 33, 34), (2, 4, 2, 18)])
def test_native_average_pool_is_torchs_to_the_bit(shape):
    x = torch.randn(shape)
    x[0, 0, 0, 1], x[-1, -1, -1, 0] = float("nan"), float("inf")
    out = native.avg_pool2(x)
    torch.testing.assert_close(out, F.avg_pool2d(x, 2, 2), rtol=0, atol=0, equal_nan=True)


@needs_library
@pytest.mark.parametrize("kw", [{"saliency": "mask"}, {"norm": False}])
def test_fused_forward_equals_the_torch_kernels_in_other_modes(kw, native_calls):
    layer = make_layer(16, 16, 3, 1, 4, 0.25, **kw)
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        layer.kernels = DgcKernels(prefer="fold")
        expected = layer(x)
        layer.kernels = DgcKernels(prefer="direct")
        layer(x)
        torch.testing.assert_close(layer(x), expected)
    assert native_calls["fused_eval"] == 2  # pinned: both calls


@needs_library
def test_fused_forward_steps_aside_for_hooks_and_autocast():
    layer = make_layer(16, 16, 3, 1, 4, 0.25)
    layer.kernels = DgcKernels(prefer="direct")
    x = torch.randn(2, 16, 6, 6)
    seen = []
    layer.norm.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        expected, _ = oracle_forward(layer, x)
        seen.clear()
        layer(x)
        torch.testing.assert_close(layer(x), expected)
    assert len(seen) == 2  # the BN ran as a module both times, so its hook fired


def _pruned_model(prefer: str) -> torch.nn.Module:
    """A fully pruned DyResNet-8 in eval whose DGC layers all run kernel ``prefer``."""
    torch.manual_seed(0)
    model = dgc.create_model("dyresnet8", num_classes=5, in_chans=1, gate_factor=0.25).eval()
    dgc.set_progress(model, 1.0)
    _prefer(model, prefer)
    return model


def _settled_direct() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A pruned DyResNet-8 that has run its native forward once, an input, and its output."""
    model = _pruned_model("direct")
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        model(x)
        return model, x, model(x)


def _prefer(model: torch.nn.Module, prefer: str | None) -> None:
    for layer in dgc.dgc_layers(model):
        layer.kernels = DgcKernels(prefer=prefer, patience=0)  # None: timed at the first call


@needs_library
def test_network_with_direct_kernels_equals_fold_and_ships_them_in_a_trace(
    native_calls, monkeypatch
):
    # A trace cannot record the ctypes call: it records each DGC layer as dgc's operator,
    # which runs the eager forward (native kernel included), at any batch.
    model = _pruned_model("fold")
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        expected = model(x)
        _prefer(model, "direct")
        model(x)
        native_calls.clear()
        # Eight layers of sums taken in another order: equal to float rounding, amplified.
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        assert native_calls["fused_eval"] == len(dgc.dgc_layers(model))
        native_calls.clear()
        _prefer(model, None)  # measured choice
        # the operator's own layers time each shape at its first call (by default, once the
        # shape recurs)
        monkeypatch.setenv("DGC_KERNEL_TIMING", "first")
        traced = torch.jit.trace(model, x[:1], check_trace=False)
        graph = str(traced.inlined_graph)
        assert graph.count("dgc::dynamic_group_conv_eval") == len(dgc.dgc_layers(model))
        for batch in (1, 4):
            torch.testing.assert_close(traced(x[:batch]), expected[:batch], rtol=1e-4, atol=1e-4)
        assert native_calls["fused_eval"] + native_calls["direct_conv"] > 0  # the operators'
        for layer in dgc.dgc_layers(model):  # model_portable.ts: torch kernels only
            layer.ship_op = False
        portable = torch.jit.trace(model, x[:1], check_trace=False)
        assert "dgc::" not in str(portable.inlined_graph)
        for batch in (1, 4):
            torch.testing.assert_close(portable(x[:batch]), expected[:batch], rtol=1e-4, atol=1e-4)


def test_without_a_compiler_the_layer_keeps_its_torch_kernels(tmp_path):
    code = (
        "import torch, dgc\n"
        "from dgc.layers import native\n"
        "assert native.library() is None\n"
        "m = dgc.create_model('dyresnet8', num_classes=5, in_chans=1).eval()\n"
        "dgc.set_progress(m, 1.0)\n"
        "dgc.set_kernel_patience(m, 0)\n"
        "with torch.no_grad(): m(torch.randn(2, 1, 12, 12))\n"
        "names = {n for l in dgc.dgc_layers(m) for n in l.kernels.chosen.values()}\n"
        "assert names and 'direct' not in names, names\n"
        "from dgc.layers.dgc_kernels import DgcKernels\n"
        "for l in dgc.dgc_layers(m): l.kernels = DgcKernels(prefer='direct')\n"
        "with torch.no_grad(): m(torch.randn(2, 1, 12, 12)); m(torch.randn(2, 1, 12, 12))\n"
        "assert all(l.kernels.last != 'direct' for l in dgc.dgc_layers(m))\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "DGC_NATIVE_DIR": str(tmp_path)}
    done = python(code, env)
    assert done.returncode == 0, done.stderr
    assert "native kernels unavailable" in done.stderr
    assert "no-such-cc" in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind


@needs_library
def test_build_is_cached_and_keyed_by_source(tmp_path):
    code = "from dgc.layers.native import build; print(build.build())"
    env = {**os.environ, "DGC_NATIVE_DIR": str(tmp_path)}
    run = [sys.executable, "-c", code]
    first = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout
    again = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout
    assert first == again and first.strip().endswith(".so")
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first.strip())]


@needs_library
def test_model_that_ran_native_eval_copies_pickles_and_follows_parameter_changes(native_calls):
    import copy
    import pickle

    model, x, y = _settled_direct()
    with torch.no_grad():
        twin, thawed = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
        del model  # the copies must not point into its tensors
        native_calls.clear()
        torch.testing.assert_close(twin(x), y)
        torch.testing.assert_close(thawed(x), y)
        assert native_calls["fused_eval"] == 2 * len(dgc.dgc_layers(twin))  # copies run native
        layer = dgc.dgc_layers(twin)[0]
        layer.weight.mul_(2.0)  # in place: same storage, new version
        layer.norm.running_var.mul_(4.0)
        _prefer(thawed, "fold")
        dgc.dgc_layers(thawed)[0].weight.mul_(2.0)
        dgc.dgc_layers(thawed)[0].norm.running_var.mul_(4.0)
        torch.testing.assert_close(twin(x), thawed(x))


@needs_library
def test_a_compiler_without_openmp_gets_the_portable_build(tmp_path):
    # Apple clang, say, has neither OpenMP nor -march=native: the second flag set must build
    # a working single-threaded library.
    fake = tmp_path / "cc-no-openmp"
    fake.write_text('#!/bin/sh\ncase "$*" in *-fopenmp*) exit 1;; esac\nexec cc "$@"\n')
    fake.chmod(0o755)
    code = (
        "import torch\n"
        "from dgc.layers import native, gathered as G\n"
        "assert native.library() is not None\n"
        "x, w = torch.randn(2, 16, 9, 9).relu(), torch.randn(8, 16, 3, 3)\n"
        "index, scale = G.select_channels(torch.rand(2, 4, 16), 12)\n"
        "ref = G.fold_conv(x, index, scale, G.weight_rows(w, 4), 3, (1, 1, 1))\n"
        "p = G.weight_rows(w, 4)\n"
        "torch.testing.assert_close(native.direct_conv(x, index, scale, p, (8, 3), (1, 1, 1)), ref)\n"
    )
    env = {**os.environ, "CC": str(fake), "DGC_NATIVE_DIR": str(tmp_path / "cache")}
    done = python(code, env)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cache").glob("*.so"))) == 1


@needs_library
def test_short_lived_threads_run_the_native_forward_and_release_their_scratch(native_calls):
    # Each calling thread gets its own scratch buffers, freed by a thread-exit destructor: a
    # thread that exits must not break the next one (no dangling per-thread state).
    import threading

    model, x, expected = _settled_direct()
    outs = []

    def run() -> None:
        with torch.no_grad():
            outs.append(model(x))

    for _ in range(4):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert len(outs) == 4 and native_calls["fused_eval"] >= 4 * len(dgc.dgc_layers(model))
    for out in outs:
        torch.testing.assert_close(out, expected)


@needs_library
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cin,k,h,w", [(16, 3, 6, 6), (24, 1, 5, 7)])
def test_training_bn_relu_runs_native_and_equals_batchnorm2d_and_relu(
    cin, k, h, w, momentum, monkeypatch
):
    layers = [make_layer(cin, 16, k, 1, 4, 0.25).train() for _ in range(2)]
    for layer in layers:
        layer.norm.momentum = momentum
    layers[1].norm.register_forward_hook(lambda *_: None)  # hooks keep torch's BN and ReLU
    calls, native_fn = [], native.bn_relu_train
    monkeypatch.setattr(native, "bn_relu_train", lambda *a: calls.append(1) or native_fn(*a))
    for _ in range(2):  # the running statistics after two updates
        x = torch.randn(3, cin, h, w) * 2 + 0.5
        xs = [x.clone().requires_grad_() for _ in layers]
        ys = [layer(xi) for layer, xi in zip(layers, xs)]
        g = torch.randn_like(ys[0])
        for layer, y in zip(layers, ys):  # gradients through the output and the gate
            (y * g).sum().add(layer.last_saliency_loss).backward()
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2  # the first layer ran the native BN-ReLU, the hooked one did not
    for (name, p1), p2 in zip(layers[0].named_parameters(), layers[1].parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, b1), b2 in zip(layers[0].norm.named_buffers(), layers[1].norm.buffers()):
        torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6, msg=name)


@needs_library
def test_a_nan_input_gives_nan_outputs_on_the_native_paths_as_on_torchs(native_calls):
    layer = make_layer(16, 16, 3, 1, 4, 0.25)
    layer.kernels = DgcKernels(prefer="direct")
    x = torch.randn(2, 16, 6, 6)
    x[0, 3, 2, 2] = float("nan")
    with torch.no_grad():
        assert layer(x)[0].isnan().any() and native_calls["fused_eval"] == 1
    layer.train()
    y = layer(x)  # the native training BN-ReLU: the NaN spreads through the batch statistics
    assert native_calls["bn_relu_train"] == 1
    assert y.isnan().all() and layer.norm.running_mean.isnan().any()
    y, sums, mean, _ = native.bn_relu_train(x, None, None, 1e-5)  # channel 3's statistics
    assert y[:, 3].isnan().all() and sums[:, 3].isnan().all() and mean[3].isnan()
    assert not y[:, 4:].isnan().any()


@needs_library
def test_fused_forward_reads_a_channel_slice_of_a_wider_tensor_in_place(native_calls):
    # A DenseNet stage's layers read features[:, :C] of one (B, C_out, H, W) tensor.
    layer = make_layer(16, 8, 1, 1, 2, 0.25)
    layer.kernels = DgcKernels(prefer="direct")
    wide = torch.randn(3, 24, 6, 6)
    x = wide[:, :16]
    assert native.channel_slice(x)[0] is x and native.channel_slice(x)[1] == 24
    with torch.no_grad():
        y = layer(x)
        assert layer.kernels.last == "direct" and native_calls["fused_eval"] == 1
        torch.testing.assert_close(y, layer(x.contiguous()), rtol=0, atol=0)
        expected, _ = oracle_forward(layer, x.contiguous())
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    odd = wide.transpose(2, 3)[:, :16]  # not a channel slice: copied first
    assert native.channel_slice(odd)[0].is_contiguous()


@needs_library
def test_a_dispatch_mode_sees_torch_kernels_where_the_native_one_was_settled():
    # FlopCounterMode cannot see a ctypes call: under it the layers run torch's kernels.
    from torch.utils.flop_counter import FlopCounterMode

    model, x, y = _settled_direct()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        counted = model(x)
    assert counter.get_total_flops() > 0
    assert all(layer.kernels.last != "direct" for layer in dgc.dgc_layers(model))
    torch.testing.assert_close(counted, y, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model(x)
    assert all(layer.kernels.last == "direct" for layer in dgc.dgc_layers(model))


def _epilogue_case(cin, cout, k, stride, h):
    """A layer settled on the fused forward, its BN after, an input and a residual."""
    layer = make_layer(cin, cout, k, stride, 4, 0.25)
    layer.kernels = DgcKernels(prefer="direct")
    bn = torch.nn.BatchNorm2d(cout).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)  # negative scales too
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, cin, h, h)
    with torch.no_grad():
        layer(x)  # settles "direct" for this shape
        residual = torch.randn_like(layer(x))
    return layer, bn, x, residual


@needs_library
@pytest.mark.parametrize(
    "cin,cout,k,stride,h",
    [(16, 16, 3, 1, 7), (16, 32, 3, 2, 9), (16, 32, 1, 2, 6), (32, 32, 3, 1, 17)],
)
def test_forward_epilogue_equals_bn_residual_and_relu_after_the_layer(cin, cout, k, stride, h):
    layer, bn, x, residual = _epilogue_case(cin, cout, k, stride, h)
    relu = torch.nn.ReLU(inplace=True)
    with torch.no_grad():
        y = layer(x)
        assert layer.kernels.last == "direct"
        cases = {
            (None, None): bn(y),
            (relu, None): torch.relu(bn(y)),
            (None, residual): bn(y) + residual,
            (relu, residual): torch.relu(bn(y) + residual),
        }
        for (act, res), expected in cases.items():
            got = layer.forward_epilogue(x, bn, act, res)
            assert got is not None
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        bn.running_mean.add_(1.0)  # an in-place change rebuilds the plan
        torch.testing.assert_close(layer.forward_epilogue(x, bn), bn(y), rtol=1e-5, atol=1e-5)


@needs_library
def test_forward_epilogue_keeps_a_nan_through_its_relu():
    layer, bn, x, residual = _epilogue_case(16, 16, 3, 1, 7)
    residual[1, 2, 3, 4] = float("nan")
    with torch.no_grad():
        y = layer.forward_epilogue(x, bn, torch.nn.ReLU(), residual)
    assert y[1, 2, 3, 4].isnan() and y.isnan().sum() == 1


@needs_library
def test_forward_epilogue_steps_aside_where_it_does_not_apply():
    layer, bn, x, residual = _epilogue_case(16, 16, 3, 1, 7)
    relu = torch.nn.ReLU()
    with torch.no_grad():
        assert layer.forward_epilogue(x, bn, relu, residual) is not None
        pinned, layer.kernels = layer.kernels, DgcKernels()  # measured choices
        assert layer.forward_epilogue(x, bn) is None  # a shape not yet timed
        layer.kernels = pinned
        assert layer.forward_epilogue(x, bn, torch.nn.GELU()) is None
        assert layer.forward_epilogue(x, bn, relu, residual[:, :8]) is None
        assert layer.forward_epilogue(x, bn.train()) is None
        bn.eval()
        handle = bn.register_forward_hook(lambda *a: None)
        assert layer.forward_epilogue(x, bn) is None
        handle.remove()
        handle = layer.register_forward_pre_hook(lambda *a: None)
        assert layer.forward_epilogue(x, bn) is None
        handle.remove()
    assert layer.forward_epilogue(x, bn) is None  # grad enabled: autograd's path
