from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dgc
from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from tests.helpers import python


def test_cifar100_dydensenet86_reproduces_the_authors_logged_totals():
    # The authors' CIFAR-100 log is named dydensenet_<params>_<flops>.txt by their main.py:
    # dydensenet_4336900_71109208.txt (hellozhuo/dgc issue #4).
    model = dgc.create_model(
        "dydensenet86", num_classes=100, heads=4, gate_factor=0.25, squeeze_rate=16
    )
    cost = dgc.count_cost(model, (3, 32, 32))
    assert (cost.macs, cost.params) == (71_109_208, 4_336_900)


def test_plain_resnet18_is_1_82_gmacs():
    cost = dgc.count_cost(dgc.create_model("resnet18"), (3, 224, 224))
    assert round(cost.macs / 1e9, 2) == 1.82
    assert cost.params == 11_689_512


def test_dgc_layer_cost_by_hand():
    # C=64 (<80, so squeeze 16 -> 8, r=8), O=128, 3x3, 8x8 in and out, h=4, g=0.25.
    layer = DynamicGroupConv2d(64, 128, 3, padding=1, heads=4, squeeze_rate=16, gate_factor=0.25)
    cost = dgc.count_cost(nn.Sequential(layer), (64, 8, 8))
    c, o, r, h, hw = 64, 128, 8, 4, 64
    macs = 2 * c * hw + h * (c * r + r + r * c + c + c + c) + 0.25 * c * o * 9 * hw
    params = c * o * 9 + h * (c * r + r * c + c) + 2 * c
    assert (cost.macs, cost.params) == (int(macs), params)


def test_conv_linear_pool_relu_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, groups=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    cost = dgc.count_cost(model, (3, 16, 16))
    conv = 3 * 8 * 9 * 8 * 8
    expected = conv + 8 * 8 * 8 + 8 * 4 * 4 * 4 + 8 * 4 * 4 + (8 * 5 + 5)
    assert cost.macs == expected
    assert [r.kind for r in cost.layers] == [
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Linear",
    ]


@pytest.mark.parametrize(
    "name,size", [("resnet20", 32), ("densenet86", 32), ("gcresnet8", 16), ("resnet18", 64)]
)
def test_dense_models_agree_with_flop_counter_mode_on_conv_and_linear(name, size):
    model = dgc.create_model(name).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    ours = dgc.count_cost(model, (3, size, size))
    conv_linear = sum(
        r.macs - (r.output_shape[-1] if r.kind == "Linear" else 0)  # minus bias adds
        for r in ours.layers
        if r.kind in ("Conv2d", "Linear")
    )
    assert 2 * conv_linear == counter.get_total_flops()


def test_macs_fall_with_gate_factor_and_heads_only_change_gate_cost():
    macs = [
        dgc.count_cost(dgc.create_model("dyresnet20", gate_factor=g), (3, 32, 32)).macs
        for g in (1.0, 0.5, 0.25)
    ]
    assert macs[0] > macs[1] > macs[2]
    h2 = dgc.count_cost(dgc.create_model("dyresnet20", heads=2), (3, 32, 32))
    h4 = dgc.count_cost(dgc.create_model("dyresnet20", heads=4), (3, 32, 32))
    assert h4.macs > h2.macs and h4.params > h2.params


@pytest.mark.parametrize("meta", [dgc.on_meta, lambda: torch.device("meta")])
def test_cost_on_meta_device_matches_and_params_equal_model_parameters(meta):
    with meta():
        model = dgc.create_model("dydensenet86", num_classes=100)
    assert all(p.is_meta for p in model.parameters())
    cost = dgc.count_cost(model, (3, 32, 32))
    assert (cost.macs, cost.params) == (71_109_208, 4_336_900)
    real = dgc.create_model("dyresnet20")
    assert dgc.count_cost(real, (3, 32, 32)).params == sum(p.numel() for p in real.parameters())


def test_counting_neither_times_nor_settles_a_kernel_choice():
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1).eval()
    dgc.count_cost(model, (1, 8, 8))
    layers = dgc.dgc_layers(model)
    assert not any(
        layer.kernels.chosen or layer.kernels.times or layer.kernels.seen for layer in layers
    )
    with torch.no_grad():
        model(torch.zeros(2, 1, 8, 8))  # an eager forward counts towards the choice
    assert all(layer.kernels.chosen or layer.kernels.seen for layer in layers)


def test_building_and_counting_a_model_to_cost_do_not_import_torchs_compiler():
    # A torch dispatch mode imports torch._dynamo at its first call: about 2 s in every process
    # that costs a point (validate, launch, the searcher), for a count that takes milliseconds.
    code = (
        "import sys, dgc\n"
        "with dgc.on_meta(): m = dgc.create_model('dyresnet20')\n"
        "assert all(p.is_meta for p in m.parameters())\n"
        "assert dgc.count_cost(dgc.create_model('dyresnet8'), (3, 32, 32)).macs > 0\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    done = python(code)
    assert done.returncode == 0, done.stderr


def test_unknown_parametrised_leaf_is_an_error():
    with pytest.raises(TypeError, match="no MAC counting rule for PReLU"):
        dgc.count_cost(nn.Sequential(nn.Conv2d(1, 2, 1), nn.PReLU()), (1, 4, 4))


def test_importing_dgc_loads_no_framework():
    code = (
        "import sys, dgc; bad = [m for m in ('ray', 'optuna', 'mlflow', 'yaml', 'pydantic') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = python(code)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dense_resnet50_at_224_is_sg_cnns_baseline_by_its_counter():
    with torch.device("meta"):
        model = dgc.create_model("resnet50")
    sg = dgc.count_cost(model, (3, 224, 224), rules="sgcnn")
    assert (round(sg.macs / 1e9, 2), round(sg.params / 1e6, 2)) == (4.09, 25.55)
    assert (sg.macs, sg.params) == (4_089_207_912, 25_549_224)
    ours = dgc.count_cost(model, (3, 224, 224))  # + ReLU and pooling; every BN's parameters
    assert ours.params == 25_557_032 and ours.macs > sg.macs


def test_sgcnn_rules_count_the_alive_filters_of_a_masked_conv():
    layer = nn.Sequential()
    layer.add_module("conv", nn.Conv2d(4, 6, 3, 1, 1, bias=False))
    layer.add_module("bn", nn.BatchNorm2d(6))
    layer.add_module("act", nn.ReLU())
    cost = dgc.count_cost(layer, (4, 5, 5), rules="sgcnn")
    assert (cost.macs, cost.params) == (4 * 6 * 9 * 25 + 6, 4 * 6 * 9 + 2 * 6)
    with pytest.raises(ValueError, match="rules='flops' is unknown"):
        dgc.count_cost(layer, (4, 5, 5), rules="flops")
