from __future__ import annotations

import pytest
import torch

import dgc

# ImageNet recipes run on 64x64 here; the networks pool adaptively, so shapes still work.
SIZE = {"resnet18": 64, "resnet34": 64, "densenet74": 64}


def _size(name: str) -> int:
    base = name.removeprefix("dy").removeprefix("gc")
    return SIZE.get(base, 32)


@pytest.mark.parametrize("name", dgc.list_models())
def test_model_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = dgc.create_model(name, num_classes=7)
    model.train()
    dgc.set_progress(model, 0.9)  # prune at the target rate so the gates are exercised
    x = torch.randn(2, 3, _size(name), _size(name))
    out = model(x)
    assert out.shape == (2, 7)
    loss = out.square().mean() + 1e-3 * dgc.aux_loss(model)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    has_dgc = bool(dgc.dgc_layers(model))
    assert has_dgc == name.startswith("dy")


def test_per_stage_values_reach_each_stage():
    model = dgc.create_model("dyresnet20", heads=[2, 4, 8], gate_factor=[0.75, 0.5, 0.25])
    by_stage = {}
    for name, m in model.named_modules():
        if isinstance(m, dgc.DynamicGroupConv2d):
            by_stage.setdefault(int(name.split(".")[1]), set()).add((m.heads, m.gate_factor))
    assert by_stage == {0: {(2, 0.75)}, 1: {(4, 0.5)}, 2: {(8, 0.25)}}


def test_static_group_baseline_uses_groups_equal_to_inverse_gate():
    model = dgc.create_model("gcdensenet86", gate_factor=0.25)
    conv = model.features[0].conv1[2]
    assert conv.groups == 4
    cost_gc = dgc.count_cost(model, (3, 32, 32))
    cost_dgc = dgc.count_cost(dgc.create_model("dydensenet86", gate_factor=0.25), (3, 32, 32))
    conv_macs = lambda c, kind: sum(r.macs for r in c.layers if ".conv1" in r.name)  # noqa: E731
    dgc_conv = sum(
        m.in_channels * m.out_channels * 0.25 * r.output_shape[-1] ** 2
        for m, r in zip(
            dgc.dgc_layers(dgc.create_model("dydensenet86")),
            [r for r in cost_dgc.layers if r.kind == "DynamicGroupConv2d"],
        )
    )
    # The 1x1 conv MACs of the static baseline equal DGC's head-conv MACs at its gate factor.
    gc_1x1 = sum(r.macs for r in cost_gc.layers if r.kind == "Conv2d" and ".conv1" in r.name)
    assert gc_1x1 == pytest.approx(dgc_conv)
    assert conv_macs(cost_gc, "gc") > 0


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("dyresnet20", dict(heads=3), r"stages\.0\.0\.conv1: heads=3 must divide"),
        (
            "dyresnet20",
            dict(heads=[2, 4]),
            r"heads=\[2, 4\] has 2 values but the network has 3 stages",
        ),
        (
            "dydensenet86",
            dict(gate_factor=1.2),
            r"features\.0\.conv1: gate_factor=1.2 must be in \(0, 1\]",
        ),
        ("gcresnet20", dict(gate_factor=0.3), r"gate_factor=0.3 has no static group conv"),
        ("dyresnet2O", {}, r"unknown model name='dyresnet2O'; did you mean .*dyresnet20"),
    ],
)
def test_constructor_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dgc.create_model(name, **kwargs)


def test_create_model_drops_none_kwargs_and_lists_by_pattern():
    model = dgc.create_model("resnet8", num_classes=None)
    assert model.num_classes == 10
    assert dgc.list_models("dy*") == [n for n in dgc.list_models() if n.startswith("dy")]
    assert dgc.model_kind("gcresnet8") == "group" and dgc.model_kind("resnet8") == "dense"


def test_digits_sized_model_runs_on_one_channel_8x8():
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
