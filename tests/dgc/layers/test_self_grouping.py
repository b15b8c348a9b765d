"""SG-CNN's self-grouping convolution: the step, the schedule, the grouped inference conv."""

from __future__ import annotations

import pytest
import torch

import dgc
from dgc.layers.self_grouping import SelfGroupingConv2d
from dgc.layers.self_grouping import diverse_groups
from dgc.layers.self_grouping import kmeans
from dgc.layers.self_grouping import nearest
from dgc.layers.self_grouping import self_group_step


def _reaches(mask: torch.Tensor, percent: float) -> bool:
    """At least as many pruned connections as numpy's linear-interpolated percentile puts at or
    below its threshold: floor(cp * (N - 1)) + 1 of N, i.e. the target up to one connection."""
    n = mask.numel()
    return int((mask == 0).sum()) >= int(percent / 100 * (n - 1)) + 1


def _layer(**kwargs) -> SelfGroupingConv2d:
    torch.manual_seed(0)
    args = {"groups": 5, "compression": 0.6, "steps": 3, "name": "l"} | kwargs
    return SelfGroupingConv2d(24, 40, 3, 1, 1, **args)


def test_kmeans_finds_separated_clusters_and_is_seeded():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    x = centres.repeat_interleave(20, 0) + 0.1 * torch.randn(60, 2, dtype=torch.float64)
    found, labels = kmeans(x, 3, torch.Generator().manual_seed(1))
    assert sorted(labels.bincount().tolist()) == [20, 20, 20]
    assert torch.cdist(found, centres).min(1).values.max() < 0.2
    again = kmeans(x, 3, torch.Generator().manual_seed(1))[1]
    assert torch.equal(labels, again)


def test_nearest_centres_are_the_ones_at_the_least_distance():
    g = torch.Generator().manual_seed(0)
    for n, d, k in [(1, 1, 1), (7, 3, 2), (300, 64, 8), (1000, 512, 4)]:
        x = torch.rand(n, d, generator=g, dtype=torch.float64)
        centres = x[torch.randperm(n, generator=g)[:k]] + 0.01
        assert torch.equal(nearest(x, centres), torch.cdist(x, centres).argmin(1))


@pytest.mark.parametrize("group_mask", ["common", "first"])
def test_a_step_gives_each_cluster_one_input_subset_and_reaches_the_percentile(group_mask):
    layer = _layer()
    mask = layer.mask
    for step, percent in enumerate((20.0, 40.0, 60.0), 1):
        gen = torch.Generator().manual_seed(step)
        new, labels = self_group_step(layer.weight, mask, 5, percent, gen, group_mask)
        assert torch.all(new <= mask), "a pruned connection came back"
        assert _reaches(new, percent), "realised sparsity below the target"
        for d in labels.unique():
            rows = new[labels == d]
            if group_mask == "common":
                assert torch.all(rows == rows[0]), f"cluster {d} reads different subsets"
            else:  # the release: every member reads a subset of the first member's subset
                assert torch.all(rows <= rows[0].unsqueeze(0) + (rows.sum(1, keepdim=True) == 0))
        mask = new


def test_first_step_is_the_same_under_both_group_mask_rules():
    layer = _layer()
    a = self_group_step(layer.weight, layer.mask, 5, 30.0, torch.Generator().manual_seed(0))
    b = self_group_step(
        layer.weight, layer.mask, 5, 30.0, torch.Generator().manual_seed(0), "first"
    )
    assert torch.equal(a[0], b[0])


def test_threshold_is_the_cumulative_percentile_of_the_centroid_importances():
    # One cluster per filter (g = O): the centroids are the importance vectors themselves, so
    # the step keeps exactly the entries above numpy's linear-interpolated percentile.
    torch.manual_seed(3)
    w = torch.randn(6, 5, 1, 1, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.float64)
    mask[0, :2] = 0  # already pruned: counts as zeros in the percentile
    new, _ = self_group_step(w, mask, 6, 50.0, torch.Generator().manual_seed(0))
    v = w.abs().sum((2, 3)) * mask
    import numpy as np

    tau = np.percentile(v.numpy().ravel(), 50.0)
    assert torch.equal(new, ((v > float(tau)).double() * mask))


def test_set_progress_runs_the_steps_between_warmup_and_ramp_end():
    model = dgc.create_model("sgresnet8", compression=0.6, sg_steps=3, num_classes=3)
    layers = dgc.sg_layers(model)
    schedule = dgc.GateSchedule(0.2, 0.6)  # steps at 0.2, 0.4 and 0.6
    seen = []
    for p in (0.0, 0.19, 0.2, 0.39, 0.4, 0.59, 0.6, 0.9, 1.0):
        dgc.set_progress(model, p, schedule)
        seen.append(layers[0]._steps_done)
        if p >= 0.6:
            assert all(_reaches(m.mask, 60.0) for m in layers)
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_coinciding_breakpoints_run_every_step_at_once():
    layer = _layer()
    layer.advance(0.5, dgc.GateSchedule(0.5, 0.5))
    assert layer._steps_done == 3 and layer.grouped


def test_steps_are_deterministic_and_survive_a_state_dict_round_trip():
    a, b = _layer(), _layer()
    for layer in (a, b):
        layer.advance(1.0)
    assert torch.equal(a.mask, b.mask)
    c = _layer()
    c.load_state_dict(a.state_dict())
    assert c.grouped and torch.equal(c.mask, a.mask)
    c.advance(1.0)  # nothing left to do: the mask stays
    assert torch.equal(c.mask, a.mask)


@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_inference_conv_equals_the_masked_conv(stride):
    layer = SelfGroupingConv2d(24, 40, 3, stride, 1, groups=5, compression=0.7, name="l")
    layer.advance(1.0)
    layer.eval()
    x = torch.randn(3, 24, 9, 9)
    with torch.no_grad():
        masked = layer._masked(x)
        for path in (layer._loop, layer._padded, layer):
            assert torch.allclose(path(x), masked, atol=1e-5)
    groups = diverse_groups(layer.mask)
    assert sum(len(o) for o in groups.outputs) == 40
    for outs, ins in zip(groups.outputs, groups.inputs):
        assert torch.all(layer.mask[outs][:, ins] == 1)
        assert layer.mask[outs].sum() == len(outs) * len(ins)


def test_a_group_that_reads_nothing_outputs_zeros():
    layer = SelfGroupingConv2d(4, 6, 1, groups=2, compression=0.5, steps=1, name="l")
    layer.advance(1.0)
    layer.mask[:3] = 0  # one group with an empty subset
    layer._groups = None
    layer.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.allclose(layer._loop(x), layer._masked(x), atol=1e-6)
        assert torch.allclose(layer._padded(x), layer._masked(x), atol=1e-6)


def test_cost_counts_the_target_before_and_the_alive_connections_after():
    layer = _layer()
    target = dgc.count_cost(layer, (24, 8, 8))
    assert target.macs == int(0.4 * 40 * 24 * 9 * 64)
    layer.advance(1.0)
    after = dgc.count_cost(layer, (24, 8, 8))
    alive = int(layer.mask.sum())
    assert (after.macs, after.params) == (alive * 9 * 64, alive * 9)
    assert after.macs <= target.macs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"compression": 1.0}, "compression=1.0 must be in"),
        ({"sg_groups": 0}, "sg_groups=0 must be at least 1"),
        ({"group_mask": "all"}, "group_mask='all' is unknown"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dgc.create_model("sgresnet8", **kwargs)


def test_a_setting_of_another_operator_is_refused():
    with pytest.raises(ValueError, match="compression=0.5 is a setting of the 'selfgroup'"):
        dgc.create_model("dyresnet8", compression=0.5)
    with pytest.raises(ValueError, match="kernels=4 is a setting of the 'dynet'"):
        dgc.create_model("sgresnet8", kernels=4)


def test_compression_zero_runs_no_step_and_is_the_dense_conv():
    layer = SelfGroupingConv2d(8, 12, 3, 1, 1, compression=0.0, name="l").eval()
    assert layer.steps == 0 and layer.grouped
    layer.advance(1.0)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.conv2d(x, layer.weight, None, 1, 1),
                              atol=1e-6)  # fmt: skip
    assert bool(layer.mask.all())
