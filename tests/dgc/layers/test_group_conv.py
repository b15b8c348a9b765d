"""dgc.layers.group_conv: the BN-ReLU-group conv's native eval path equals its torch modules,
steps aside where it would change behaviour, and ships as dgc's operator in traces/exports."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import dgc
from dgc.layers.group_conv import PreactGroupConv2d
from dgc.layers.kernel_choice import KernelChoice
from tests.dgc.helpers import needs_library

SHAPES = [  # (C, O, k, stride, padding, groups, H, W)
    (32, 8, 3, 1, 1, 4, 12, 12),  # CondenseNet's stage 1 (2 outputs a group)
    (128, 32, 3, 1, 1, 4, 8, 8),  # stage 3 (8 outputs a group: two blocks of 4)
    (24, 12, 3, 1, 1, 3, 9, 7),  # 3 groups, 4 outputs each, not square
    (16, 12, 3, 2, 1, 2, 11, 11),  # stride 2, 6 outputs a group
    (16, 16, 1, 1, 0, 4, 6, 6),  # 1x1
    (8, 4, 5, 1, 2, 1, 7, 7),  # one group (a dense conv), 5x5
]


def _module(c, o, k, stride, padding, groups, affine=True, seed=0):
    torch.manual_seed(seed)
    m = PreactGroupConv2d(c, o, k, stride, padding, groups)
    if not affine:
        m[0] = nn.BatchNorm2d(c, affine=False)
    with torch.no_grad():
        m[0].running_mean.uniform_(-0.5, 0.5)
        m[0].running_var.uniform_(0.5, 2.0)
        if affine:
            m[0].weight.uniform_(0.5, 1.5)
            m[0].bias.uniform_(-0.2, 0.2)
    return m.eval()


def _torch_forward(m: PreactGroupConv2d, x: torch.Tensor) -> torch.Tensor:
    return nn.Sequential.forward(m, x)


@needs_library
@pytest.mark.parametrize("c,o,k,stride,padding,groups,h,w", SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_native_eval_equals_the_torch_modules(
    c, o, k, stride, padding, groups, h, w, batch, affine
):
    m = _module(c, o, k, stride, padding, groups, affine)
    m.kernels = KernelChoice(prefer="native")
    x = torch.randn(batch, c, h, w)
    with torch.no_grad():
        expected = _torch_forward(m, x)
        y = m(x)
    assert m.kernels.last == "native"
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@needs_library
def test_each_shape_is_timed_once_then_runs_its_choice():
    m = _module(32, 8, 3, 1, 1, 4)
    m.kernels.patience = 0  # timed at the first call (the default waits for a recurrence)
    with torch.no_grad():
        for batch in (1, 2, 1, 2):
            m(torch.randn(batch, 32, 8, 8))
    assert set(m.kernels.times) == {
        ((b, 32, 8, 8), torch.float32, torch.device("cpu")) for b in (1, 2)
    }
    assert set(m.kernels.chosen.values()) <= {"native", "torch"}
    # carried by training checkpoints with the DGC layers' choices
    assert dgc.kernel_choices(nn.Sequential(m)) == {"0.kernels": m.kernels.chosen}


@needs_library
def test_training_grad_hooks_and_autocast_run_the_torch_modules():
    m = _module(32, 8, 3, 1, 1, 4)
    m.kernels = KernelChoice(prefer="native")
    x = torch.randn(2, 32, 8, 8)

    def native_ran(run) -> bool:
        m.kernels.last = None
        run()
        return m.kernels.last == "native"

    with torch.no_grad():
        assert native_ran(lambda: m(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not native_ran(lambda: m(x))
        m.double()
        assert not native_ran(lambda: m(x.double()))  # float32 only
        m.float()
    assert not native_ran(lambda: m(x))  # eval with grad enabled: autograd through torch's
    assert not native_ran(lambda: m.train()(x))
    m.eval()
    seen = []
    m[2].register_forward_hook(lambda mod, i, out: seen.append(tuple(out.shape)))  # count_cost
    with torch.no_grad():
        assert not native_ran(lambda: m(x))
    assert seen == [(2, 8, 8, 8)]


@needs_library
def test_the_plan_follows_in_place_updates_and_copies_build_their_own():
    m = _module(32, 8, 3, 1, 1, 4)
    m.kernels = KernelChoice(prefer="native")
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        m(x)  # a plan that points into m's tensors
        m[2].weight.mul_(2.0)
        m[0].running_var.mul_(4.0)
        m[0].bias.add_(0.3)
        torch.testing.assert_close(m(x), _torch_forward(m, x), rtol=1e-5, atol=1e-5)
        twin, thawed = copy.deepcopy(m), pickle.loads(pickle.dumps(m))
        twin[2].weight.mul_(0.5)
        torch.testing.assert_close(twin(x), _torch_forward(twin, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(thawed(x), m(x))


def test_state_dict_keys_are_the_sequentials():
    plain = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                          nn.Conv2d(16, 8, 3, 1, 1, groups=4, bias=False))  # fmt: skip
    m = PreactGroupConv2d(16, 8, 3, 1, 1, groups=4)
    assert m.state_dict().keys() == plain.state_dict().keys()
    m.load_state_dict(plain.state_dict())  # checkpoints written before this module load


@needs_library
def test_a_nan_input_gives_nan_outputs_natively():
    m = _module(16, 8, 3, 1, 1, 4)
    m.kernels = KernelChoice(prefer="native")
    x = torch.randn(1, 16, 6, 6)
    x[0, 0, 2, 2] = float("nan")
    with torch.no_grad():
        y = m(x)
    assert m.kernels.last == "native"
    assert torch.isnan(y[0, :2, 1:4, 1:4]).all() and not torch.isnan(y[0, 2:]).any()


@needs_library
@pytest.mark.parametrize("c,o,k,stride,padding,groups,h,w", SHAPES[:4])
def test_traced_and_exported_modules_record_dgcs_operator(c, o, k, stride, padding, groups, h, w):
    m = _module(c, o, k, stride, padding, groups)
    x = torch.randn(3, c, h, w)
    with torch.no_grad():
        expected = _torch_forward(m, x)
        m(x[:1])  # eager eval first, as search export runs it: the choice is settled
        traced = torch.jit.trace(m, x[:1], check_trace=False)
    assert str(traced.inlined_graph).count("dgc::preact_group_conv_eval") == 1
    batch = torch.export.Dim("batch")
    program = torch.export.export(m, (x[:2],), dynamic_shapes=({0: batch},))
    assert "preact_group_conv_eval" in str(program.graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
        m.ship_op = False
        portable = torch.jit.trace(m, x[:1], check_trace=False)
    assert "dgc::" not in str(portable.inlined_graph)
    torch.testing.assert_close(portable(x), expected, rtol=1e-5, atol=1e-5)


@needs_library
def test_densenet_eval_with_native_group_convs_equals_torch_kernels_only():
    model = dgc.create_model("dydensenet86", num_classes=10)
    dgc.set_progress(model, 1.0)
    x = torch.randn(2, 3, 16, 16)
    for bn in model.modules():  # statistics of one batch (the defaults overflow 86 layers deep)
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16))
    model.eval()
    convs = [m for m in model.modules() if isinstance(m, PreactGroupConv2d)]
    assert len(convs) == 42
    with torch.no_grad():
        for m in convs:
            m.kernels = KernelChoice(prefer="torch")
        expected = model(x)
        for m in convs:
            m.kernels = KernelChoice(prefer="native")
        y = model(x)
    assert {m.kernels.last for m in convs} == {"native"}
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@needs_library
def test_forward_into_writes_a_channel_slice_in_place():
    m = _module(32, 8, 3, 1, 1, 4)
    wide_in, features = torch.randn(3, 40, 8, 8), torch.zeros(3, 20, 8, 8)
    x = wide_in[:, 4:36]  # a channel slice at an offset
    with torch.no_grad():
        expected = _torch_forward(m, x.contiguous())
        for prefer in ("native", "torch", None):  # the new shape's timing too (None)
            m.kernels = KernelChoice(prefer=prefer)
            features.zero_()
            m.forward_into(x, features[:, 6:14])
            torch.testing.assert_close(features[:, 6:14], expected, rtol=1e-5, atol=1e-5)
            assert not features[:, :6].any() and not features[:, 14:].any()
