from __future__ import annotations

import pytest
import torch

import dgc
from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.schedule import inactive_channels
from tests.dgc.helpers import assert_matches_oracle


def _pair(seed: int, **kw: object) -> tuple[DynamicGroupConv2d, DynamicGroupConv2d]:
    torch.manual_seed(seed)
    a = DynamicGroupConv2d(**kw)  # type: ignore[arg-type]
    b = DynamicGroupConv2d(**kw)  # type: ignore[arg-type]
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("impl", ["masked", "gather"])
@pytest.mark.parametrize(
    "kw,n_inact",
    [
        (dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, heads=4), 12),
        (dict(in_channels=96, out_channels=48, kernel_size=1, heads=4, gate_factor=0.5), 30),
        (dict(in_channels=32, out_channels=32, kernel_size=3, stride=2, padding=1, heads=2), 0),
        (dict(in_channels=16, out_channels=32, kernel_size=1, stride=2, heads=4), 8),
    ],
)
def test_dgc_layer_matches_per_head_oracle_outputs_and_gradients(kw, n_inact, impl):
    layer, ref = _pair(0, impl=impl, **kw)
    layer.set_inactive(n_inact)
    ref.set_inactive(n_inact)
    x = torch.randn(3, kw["in_channels"], 8, 8, dtype=torch.float64)
    layer.double()
    ref.double()
    assert_matches_oracle(layer, ref, x)


def test_gradcheck_of_the_gathered_conv():
    from dgc.layers.dgc_autograd import GatheredGroupConv

    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 2, 2, dtype=torch.float64, requires_grad=True)  # kept saliencies
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[[0, 2], [3, 1]], [[1, 2], [0, 3]]])
    fn = lambda a, b, c: GatheredGroupConv.apply(a, b, c, index, 2, 1, 1, False, False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, s, w))


def test_gradcheck_of_the_fused_gated_conv():
    from dgc.layers.dgc_autograd import GatedGroupConv

    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: GatedGroupConv.apply(a, b, c, 1, 1, 1), (x, s, w)
    )


@pytest.mark.parametrize("impl", ["masked", "gather"])
def test_deactivated_channels_get_exactly_zero_conv_weight_gradient(impl):
    torch.manual_seed(1)
    layer = DynamicGroupConv2d(16, 8, 3, padding=1, heads=2, gate_factor=0.25, impl=impl)
    layer.set_inactive(12)
    x = torch.randn(1, 16, 6, 6)
    captured = {}
    layer.gate.register_forward_hook(lambda m, i, o: captured.setdefault("s", o.detach()))
    layer(x).sum().backward()
    sal = captured["s"][0]  # (heads, C)
    for head in range(2):
        t = sal[head].sort().values[11]
        pruned = sal[head] <= t
        assert pruned.sum() >= 12
        rows = layer.weight.grad[head * 4 : (head + 1) * 4]  # (O/h, C, k, k)
        assert torch.all(rows[:, pruned] == 0)
        assert torch.any(rows[:, ~pruned] != 0)


def test_ties_at_threshold_remove_more_than_n_channels():
    from dgc.layers.saliency import deactivate_bottom_k

    s = torch.tensor([[[0.0, 0.0, 0.0, 0.5, 0.5, 0.75]]])
    # n=2: the 2nd smallest is 0, so all three zeros go (ties), nothing else.
    assert torch.equal(deactivate_bottom_k(s, 2), s)
    # n=4: the 4th smallest is 0.5; both 0.5s go, so 5 channels are removed, not 4.
    assert deactivate_bottom_k(s, 4).tolist() == [[[0, 0, 0, 0, 0, 0.75]]]
    assert torch.equal(deactivate_bottom_k(s, 0), s)


@pytest.mark.parametrize("p,expected", [(0.0, 0), (1 / 12, 0), (0.5, 60), (0.75, 96), (1.0, 96)])
def test_inactive_channels_schedule(p, expected):
    # C=128, g=0.25: target round(96) = 96; at p=0.5: round(96 * 1.5 * (0.5 - 1/12)) = 60.
    assert inactive_channels(p, 128, 0.25) == expected


def test_inactive_channels_rounds_half_to_even_like_the_reference():
    assert inactive_channels(1.0, 10, 0.45) == round(5.5) == 6
    assert inactive_channels(1.0, 10, 0.75) == round(2.5) == 2


def test_set_progress_writes_buffers_and_eval_uses_them():
    model = dgc.create_model("dyresnet8", num_classes=3, in_chans=1, gate_factor=0.25)
    dgc.set_progress(model, 0.9)
    layers = dgc.dgc_layers(model)
    assert all(int(m.inactive_channels) == round(m.in_channels * 0.75) for m in layers)
    state = model.state_dict()
    assert any(k.endswith("inactive_channels") for k in state)
    fresh = dgc.create_model("dyresnet8", num_classes=3, in_chans=1, gate_factor=0.25)
    assert all(int(m.inactive_channels) == 0 for m in dgc.dgc_layers(fresh))
    fresh.load_state_dict(state)
    fresh.eval()
    seen = []
    first = dgc.dgc_layers(fresh)[0]
    first.gate.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        fresh(torch.randn(2, 1, 8, 8))
    assert first.n_inactive == int(first.inactive_channels) > 0  # mirror restored on load
    kept = dgc.layers.saliency.deactivate_bottom_k(seen[0], first.n_inactive) > 0
    assert kept.sum(-1).max() <= first.in_channels - round(first.in_channels * 0.75)


def test_set_progress_rejects_out_of_range():
    with pytest.raises(ValueError, match="progress=1.5"):
        dgc.set_progress(dgc.create_model("dyresnet8"), 1.5)


def test_aux_loss_sums_saliency_terms():
    model = dgc.create_model("dyresnet8", num_classes=3)
    model(torch.randn(2, 3, 16, 16))
    layers = dgc.dgc_layers(model)
    expected = sum(m.last_saliency_loss for m in layers)
    torch.testing.assert_close(dgc.aux_loss(model), expected)
    # fc2 bias starts at 1, so every head's mean saliency starts near 1.
    assert (
        0.3 * len(layers)
        < float(dgc.aux_loss(model).detach()) / layers[0].heads
        < 3.0 * len(layers)
    )


@pytest.mark.parametrize("gate", [0.25, 0.9])  # gather and masked paths under "auto"
def test_bf16_autocast_backward_runs(gate):
    layer = DynamicGroupConv2d(16, 16, 3, padding=1, heads=4, gate_factor=gate)
    layer.set_inactive(layer.target_inactive)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(in_channels=60, out_channels=64, kernel_size=1, heads=8),
            r"heads=8 must divide.*in_channels=60",
        ),
        (
            dict(in_channels=64, out_channels=64, kernel_size=1, gate_factor=1.5),
            r"gate_factor=1.5 must be in \(0, 1\]",
        ),
        (dict(in_channels=64, out_channels=64, kernel_size=1, gate_factor=0.0), r"gate_factor=0.0"),
        (
            dict(in_channels=16, out_channels=16, kernel_size=1, gate_factor=0.01),
            r"keeps no channel",
        ),
        (dict(in_channels=16, out_channels=16, kernel_size=1, squeeze_rate=64), r"squeeze_rate=64"),
    ],
)
def test_constructor_errors_name_layer_value_and_rule(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        DynamicGroupConv2d(name="stages.1.0.conv1", **kw)
    assert "stages.1.0.conv1" in str(info.value)


@pytest.mark.parametrize("impl", ["masked", "gather"])
def test_no_grad_path_equals_autograd_path_and_traces(impl, tmp_path):
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(16, 16, 3, padding=1, heads=4, impl=impl).eval()
    layer.set_inactive(12)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        plain = layer(x)
        traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(layer(x).detach(), plain)
    traced.save(str(tmp_path / "m.ts"))
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.ts"))(x), plain)


@pytest.mark.parametrize("training", [True, False])
def test_saliency_and_selection_stay_float32_under_bf16_autocast(training):
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(32, 32, 3, padding=1, heads=4, gate_factor=0.25)
    layer.set_inactive(layer.target_inactive)
    layer.train(training)
    seen = []
    layer.gate.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    x = torch.randn(4, 32, 8, 8)
    with torch.no_grad():
        layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    assert seen[1].dtype == torch.float32
    assert torch.equal(seen[0], seen[1])  # same saliencies, hence the same kept channels


def test_gate_init_defaults_to_the_papers_and_a_smaller_one_only_narrows_the_saliencies():
    torch.manual_seed(0)
    paper = DynamicGroupConv2d(32, 32, 3, padding=1)
    torch.manual_seed(0)
    explicit = DynamicGroupConv2d(32, 32, 3, padding=1, gate_init=1.0)
    torch.manual_seed(0)
    narrow = DynamicGroupConv2d(32, 32, 3, padding=1, gate_init=0.1)
    a, b, c = paper.state_dict(), explicit.state_dict(), narrow.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the default is today's network
    for k in a:  # the same draws; only fc2's weights are scaled
        if k == "gate.fc2_weight":
            torch.testing.assert_close(c[k], 0.1 * a[k])
        else:
            assert torch.equal(a[k], c[k]), k
    z = torch.rand(16, 32)
    wide, tight = paper.gate(z), narrow.gate(z)
    assert (wide == 0).any() and (tight > 0).all()  # the paper's cuts some at init, not this
    assert (tight - 1).abs().mean() < 0.2 * (wide - 1).abs().mean()  # near 1
    with pytest.raises(ValueError, match="gate_init=0"):
        DynamicGroupConv2d(32, 32, 3, gate_init=0.0)
