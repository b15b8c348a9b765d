"""dgc.program: a network exported as one operator loads back as the eager model (outputs,
any batch, in-place updates) and says clearly when it cannot be rebuilt."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import dgc
from tests.dgc.helpers import calibrated

KWARGS = {"num_classes": 10, "in_chans": 1, "gate_factor": 0.25}


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = dgc.create_model("dyresnet8", **KWARGS)
    dgc.set_progress(model, 1.0)
    return model.eval()


def _saved_and_loaded(
    shipped: dgc.ShippedModel, example: torch.Tensor, tmp_path
) -> torch.nn.Module:
    batch = torch.export.Dim("batch")
    program = torch.export.export(shipped, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "model.pt2")
    return torch.export.load(tmp_path / "model.pt2").module()


@pytest.mark.parametrize("name", ["dyresnet8", "dydensenet86"])
def test_the_loaded_program_is_one_operator_with_the_eager_outputs(name, tmp_path):
    if name == "dyresnet8":
        model, kwargs, size = _resnet(), KWARGS, (1, 8, 8)
    else:  # its eval forward writes features in place, which export itself cannot record
        model, kwargs, size = calibrated(name), {"num_classes": 10}, (3, 16, 16)
    shipped = dgc.ShippedModel(model, name, kwargs, torch.randn(2, *size))
    loaded = _saved_and_loaded(shipped, torch.randn(2, *size), tmp_path)
    graph = str(loaded.graph)
    assert graph.count("dgc.model_eval") == 1 and "aten" not in graph
    assert set(loaded.state_dict()) == {"tensors_float32", "tensors_int64"}
    for batch in (1, 3):
        x = torch.randn(batch, *size)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


def test_the_operators_network_shares_the_programs_tensors(tmp_path):
    model = _resnet()
    shipped = dgc.ShippedModel(model, "dyresnet8", KWARGS, torch.randn(2, 1, 8, 8))
    loaded = _saved_and_loaded(shipped, torch.randn(2, 1, 8, 8), tmp_path)
    x = torch.randn(2, 1, 8, 8)
    layout = {
        key: (group, offset, shape)
        for key, group, offset, shape in json.loads(shipped.spec)["layout"]
    }
    _, offset, shape = layout["stages.0.0.conv1.weight"]
    with torch.no_grad():
        loaded(x)  # the network is built, its native plans made
        loaded.tensors_float32[offset : offset + torch.Size(shape).numel()].mul_(2.0)
        model.stages[0][0].conv1.weight.mul_(2.0)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_the_operators_network_is_sealed_and_built_again_after_a_write(tmp_path):
    from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
    from dgc.program import _MODELS

    model = _resnet()
    shipped = dgc.ShippedModel(model, "dyresnet8", KWARGS, torch.randn(2, 1, 8, 8))
    loaded = _saved_and_loaded(shipped, torch.randn(2, 1, 8, 8), tmp_path)
    packed, x = [loaded.tensors_float32, loaded.tensors_int64], torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        loaded(x)
        network = _MODELS.get(packed, shipped.spec)
        layers = [m for m in network.modules() if isinstance(m, DynamicGroupConv2d)]
        assert layers and all(m.sealed for m in layers)
        assert not any(m.sealed for m in model.modules() if isinstance(m, DynamicGroupConv2d))
        loaded(x)
        assert _MODELS.get(packed, shipped.spec) is network  # calls reuse it
        loaded.tensors_float32.mul_(0.9)  # every weight, BN statistic and gate at once
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.mul_(0.9)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
        assert _MODELS.get(packed, shipped.spec) is not network


def test_a_sealed_layer_keeps_the_autocast_check():
    from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
    from dgc.program import seal

    torch.manual_seed(0)
    eager = DynamicGroupConv2d(16, 16, 3, padding=1, gate_factor=0.25).eval()
    eager.set_inactive(12)
    sealed = copy.deepcopy(eager)
    seal(sealed)
    x = torch.randn(2, 16, 16, 16)
    for layer in (eager, sealed):
        layer.kernels.prefer = "direct"  # the native call wherever it may run
    with torch.no_grad():
        torch.testing.assert_close(sealed(x), eager(x))  # native, float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, expected = sealed(x), eager(x)  # unfused: torch's BN and gate
    assert sealed.sealed and not eager.sealed
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_spec_that_does_not_rebuild_the_network_is_a_clear_error():
    model = _resnet()
    wrong = dgc.ShippedModel(model, "dyresnet8", {**KWARGS, "heads": 2}, torch.randn(2, 1, 8, 8))
    with pytest.raises(RuntimeError, match="size mismatch for stages"):
        wrong(torch.randn(2, 1, 8, 8))
