from __future__ import annotations

import pytest
import torch

import dgc
from dgc.layers import native
from dgc.layers.dgc_kernels import DgcKernels
from tests.dgc.helpers import calibrated

# ImageNet recipes run on 32x32 here (their last stage at 1x1); the networks pool
# adaptively, so shapes still work.
SIZE = 32


@pytest.mark.parametrize("name", dgc.list_models())
def test_model_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = dgc.create_model(name, num_classes=7)
    model.train()
    dgc.set_progress(model, 0.9)  # prune at the target rate so the gates are exercised
    for layer in dgc.dgc_layers(model):  # the default kernels, untimed: gradients are the point
        layer.kernels = DgcKernels(measure=False)
    x = torch.randn(2, 3, SIZE, SIZE)
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
    assert dgc.model_kind("sgdensenet86") == "selfgroup" and dgc.model_kind("dnresnet50") == "dynet"
    assert dgc.variant_of("sgresnet20", "dynet") == "dnresnet20"
    assert dgc.variant_of("densenet86", "selfgroup") == "sgdensenet86"


def test_digits_sized_model_runs_on_one_channel_8x8():
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def _run(name: str, **kw) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Train-mode output, every gradient, and the eval output of a seeded network."""
    torch.manual_seed(0)
    model = dgc.create_model(name, num_classes=10, in_chans=1, **kw)
    dgc.set_progress(model, 0.9)
    for layer in dgc.dgc_layers(model):  # training forward and backward on one kernel in
        layer.kernels = DgcKernels(prefer="fold")  # every instance: comparable bit for bit
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        ev = model.eval()(x)
    return y.detach(), grads, ev


@pytest.mark.parametrize("name", ["dyresnet8", "dydensenet86"])
def test_design_switches_at_the_paper_defaults_are_bit_identical(name, monkeypatch):
    # Untimed kernel choices (each shape's default) in both instances: timed choices depend on
    # the machine's load, and the kernels round differently.
    monkeypatch.setenv("DGC_KERNEL_TIMING", "0")
    base = _run(name)
    paper = _run(name, gate_shortcut=True, saliency="scale", double_norm=True)
    assert torch.equal(base[0], paper[0])
    assert all(torch.equal(a, b) for a, b in zip(base[1], paper[1]))
    assert torch.equal(base[2], paper[2])


@pytest.mark.parametrize(
    "switch", [{"gate_shortcut": False}, {"saliency": "mask"}, {"double_norm": False}]
)
def test_each_design_switch_trains_and_changes_the_network(switch):
    y, grads, ev = _run("dyresnet8", **switch)
    assert torch.isfinite(y).all() and torch.isfinite(ev).all()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert not torch.equal(ev, _run("dyresnet8")[2])


def test_ungated_shortcut_is_a_dense_conv_with_its_macs():
    gated = dgc.create_model("dyresnet8", num_classes=10, in_chans=1)
    plain = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, gate_shortcut=False)
    assert isinstance(plain.stages[1][0].downsample[0], torch.nn.Conv2d)
    assert isinstance(gated.stages[1][0].downsample[0], dgc.DynamicGroupConv2d)
    # Hand-counted (docs/methods.md 1.7). Stage 2's shortcut, 16->32 from 8x8 to 4x4, heads 4,
    # hidden 2 (squeeze 16 halved below 80 channels): ReLU + pool 2*16*64 = 2048, gates
    # 4*(16*2 + 2 + 2*16 + 3*16) = 456, convs 4 * 16*8*16*0.5 = 4096: 6600 against the dense
    # 16*32*16 = 8192. Stage 3's, 32->64 from 4x4 to 2x2, hidden 4: 1024 + 4*(32*4 + 4 + 4*32
    # + 3*32) + 4 * 32*16*4*0.5 = 1024 + 1424 + 4096 = 6544 against 32*64*4 = 8192.
    diff = dgc.count_cost(plain, (1, 8, 8)).macs - dgc.count_cost(gated, (1, 8, 8)).macs
    assert diff == (8192 - 6600) + (8192 - 6544)


def test_single_norm_drops_the_layers_bn_only_where_the_block_normalises():
    res = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, double_norm=False)
    assert all(isinstance(m.norm, torch.nn.Identity) for m in dgc.dgc_layers(res))
    paper = dgc.create_model("dyresnet8", num_classes=10, in_chans=1)
    # One ReLU fewer per DGC layer (C x input H*W at 8x8): stage 1 conv1, conv2 16x64 each;
    # stage 2 conv1 16x64, conv2 32x16, shortcut 16x64; stage 3 conv1 32x16, conv2 64x4,
    # shortcut 32x16.
    relus = 1024 + 1024 + 1024 + 512 + 1024 + 512 + 256 + 512
    cost = dgc.count_cost(paper, (1, 8, 8)).macs - dgc.count_cost(res, (1, 8, 8)).macs
    assert cost == relus
    dense = dgc.create_model("dydensenet86", num_classes=10, double_norm=False)
    assert all(isinstance(m.norm, torch.nn.BatchNorm2d) for m in dgc.dgc_layers(dense))


def test_mask_saliency_multiplies_kept_channels_by_one():
    from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
    from dgc.layers.saliency import deactivate_bottom_k

    torch.manual_seed(0)
    layer = DynamicGroupConv2d(8, 8, 1, heads=2, gate_factor=0.5, saliency="mask", norm=False)
    layer.set_inactive(4)
    x = torch.randn(3, 8, 5, 5)
    sal = layer.gate(x.mean(dim=(2, 3)))  # (B, h, C)
    mask = (deactivate_bottom_k(sal, 4) > 0).float()  # (B, h, C)
    w = layer.weight.view(2, 4, 8)  # head-major rows: (h, O/h, C)
    expect = torch.einsum("bhc,hoc,bcxy->bhoxy", mask, w, x)  # (B, h, O/h, H, W)
    expect = expect.transpose(1, 2).reshape(3, 8, 5, 5)  # heads interleaved
    for training in (True, False):
        layer.train(training)
        torch.testing.assert_close(layer(x).detach(), expect, rtol=1e-5, atol=1e-5)


def test_a_dgc_network_starts_from_its_dense_networks_kernels():
    from dgc.layers.dgc_autograd import masked_conv

    torch.manual_seed(0)
    dense = dgc.create_model("resnet8", num_classes=10, in_chans=1)
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1)
    n = dgc.load_dense_weights(model, dense.state_dict())
    assert n == len(dense.state_dict())  # every dense tensor has its place
    d = dict(dense.named_modules())
    for name, layer in model.named_modules():
        if isinstance(layer, dgc.DynamicGroupConv2d):
            # All channels kept at saliency 1: each output channel is its dense conv's.
            x = torch.randn(2, layer.in_channels, 6, 6)
            ones = torch.ones(2, layer.heads, layer.in_channels)
            args = (layer.stride, layer.padding, layer.dilation)
            got = masked_conv(x, ones, layer.weight, 0, layer.heads, args)
            torch.testing.assert_close(got, d[name](x), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.fc.weight, dense.fc.weight)
    assert torch.equal(model.stages[0][0].bn1.running_var, dense.stages[0][0].bn1.running_var)
    group = dgc.create_model("gcresnet8", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"tensors have other shapes .*stages\.0\.0\.conv1"):
        dgc.load_dense_weights(group, dense.state_dict())


def test_a_dense_start_survives_untrained_gates_only_when_they_start_near_one():
    # A single-norm DGC network started from its dense network, before any channel is cut,
    # computes the dense network when its saliencies start at about 1 (a small gate_init);
    # at the paper's init they scale each channel by 1 +- 0.7 and zero some, and the start is
    # lost (on CIFAR-10: 64.7% against the dense 66.4%, and 14.0% at the paper's init).
    torch.manual_seed(0)
    dense = dgc.create_model("resnet8", num_classes=10, in_chans=1).eval()
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        want = dense(x)  # (B, classes)
    gaps = {}
    for gate_init in (1e-4, 1.0):
        model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, double_norm=False,
                                 gate_init=gate_init)  # fmt: skip
        dgc.load_dense_weights(model, dense.state_dict())
        dgc.set_progress(model, 0.0)  # nothing cut yet
        with torch.no_grad():
            gaps[gate_init] = ((model.eval()(x) - want).norm() / want.norm()).item()
    assert gaps[1e-4] < 1e-2
    assert gaps[1.0] > 0.05


def test_imagenet_stem_runs_channels_last_in_eval_with_or_without_grad():
    # Eval on the CPU: channels-last (also with grad enabled, as torch.export and so the MLflow
    # model record it); training: NCHW. Outputs equal the plain NCHW stem's.
    torch.manual_seed(0)
    stem = dgc.create_model("resnet18").stem.eval()
    x = torch.randn(2, 3, 32, 32)
    plain = torch.nn.Sequential.forward(stem, x)
    torch.testing.assert_close(stem(x), plain)
    program = torch.export.export(stem, (x,))
    formats = [
        n.kwargs.get("memory_format") for n in program.graph.nodes if n.op == "call_function"
    ]
    assert torch.channels_last in formats
    torch.testing.assert_close(program.module()(x), plain)
    program = torch.export.export(stem.train(), (x,))
    formats = [
        n.kwargs.get("memory_format") for n in program.graph.nodes if n.op == "call_function"
    ]
    assert torch.channels_last not in formats


def test_kernel_choices_survive_a_weights_only_checkpoint_and_settle_a_fresh_model(tmp_path):
    model = _trained_once("dyresnet8")
    choices = dgc.kernel_choices(model)
    assert any(choices.values())  # eval choices at least (training ones need the native library)
    torch.save({"kernels": choices}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["kernels"]
    fresh = dgc.create_model("dyresnet8", num_classes=10, in_chans=1)
    dgc.set_kernel_choices(fresh, {**loaded, "no.such.layer": {"k": "fold"}})
    assert dgc.kernel_choices(fresh) == choices


def _trained_once(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = dgc.create_model(name, num_classes=10, in_chans=1)
    dgc.set_progress(model, 1.0)
    dgc.set_kernel_patience(model, 0)  # each shape timed and settled at its first call
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    with torch.no_grad():
        model.eval()(torch.randn(2, 1, 8, 8))
    return model


@pytest.mark.skipif(native.library() is None, reason="no C compiler here")
def test_densenet_transitions_pool_natively_in_eval_without_grad_only(monkeypatch):
    pooled = []
    real = native.avg_pool2
    monkeypatch.setattr(native, "avg_pool2", lambda x: pooled.append(x.shape) or real(x))
    model, x = calibrated("densenet86"), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
    assert pooled == [(2, 128, 16, 16), (2, 352, 8, 8)]  # the two transitions
    pooled.clear()
    with torch.enable_grad():
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)  # module by module
    with torch.no_grad():
        torch.jit.trace(model, x, check_trace=False)  # a trace records torch's pool
    assert pooled == []


@pytest.mark.parametrize("kind", ["", "gc", "dy", "sg", "dn"])
def test_densenet_eval_writes_features_in_place_with_the_concatenations_outputs(kind):
    # DGC with every channel kept: the two paths round differently (about 1e-7), and with 40
    # layers' bottom-k some saliency lies that close to its threshold for about one input in
    # two (measured), keeping another channel in each path (both right, outputs apart)
    model = calibrated(f"{kind}densenet86", progress=0.0 if kind == "dy" else 1.0)
    for batch in (1, 3):  # at batch 3 every layer reads a channel slice of its stage's tensor
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            concatenated = model.forward_head(model.features(model.stem(x)))
            assert torch.isfinite(concatenated).all()
            torch.testing.assert_close(model(x), concatenated, rtol=1e-4, atol=1e-5)
            if batch == 1:  # a trace records the slices and copies (and dgc's layer operators)
                traced = torch.jit.trace(model, x, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), concatenated, rtol=1e-4, atol=1e-5)  # batch 3


def test_densenet_hooks_keep_the_concatenating_forward():
    model = calibrated("densenet86")
    calls = []
    model.features[3].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert calls == [(2, 16 + 4 * 8, 16, 16)]
    model.features[3]._forward_hooks.clear()
    model.features[5].conv2.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert calls[1:] == [(2, 32, 16, 16)]


@pytest.mark.parametrize("name,size", [("dyresnet8", 16), ("dyresnet50", 32)])
def test_resnet_eval_with_fused_epilogues_equals_the_module_by_module_forward(name, size):
    # Without grad the blocks' BN (+ shortcut) (+ ReLU) run inside the DGC layers' native call
    # (dgc.models.resnet.conv_bn); with grad every module runs on its own. ResNet-50: its
    # first stage (bottlenecks, a downsample), whose random-weight activations stay finite.
    model = calibrated(name, size)
    net = model if name == "dyresnet8" else torch.nn.Sequential(model.stem, model.stages[0])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        net(x)  # settles the kernel choices
        fused = net(x)
    expected = net(x).detach()
    assert torch.isfinite(expected).all()
    tol = {"rtol": 1e-4, "atol": 1e-5 * float(expected.abs().max())}  # sums in another order
    torch.testing.assert_close(fused, expected, **tol)
    seen = []
    model.stages[0][0].bn1.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, **tol)
    assert seen == [1]  # a hooked BN runs as a module
