from __future__ import annotations

import pytest

from spaces.convert import apply_to_trial
from spaces.convert import assemble
from spaces.convert import to_optuna_distributions
from spaces.load import SpaceError
from spaces.load import builtin_spaces
from spaces.load import load_space
from spaces.load import parse_space
from spaces.load import resolve_space_path


@pytest.mark.parametrize("name", builtin_spaces())
def test_every_shipped_space_loads(name):
    space = load_space(resolve_space_path(name))
    assert space.params


@pytest.mark.parametrize("params,match", [
    ({"a": {"type": "float", "low": 2, "high": 1}}, r"my.yaml: params.a.float: low=2.0 > high=1.0; swap them"),
    ({"a": {"type": "float", "low": 0, "high": 1, "log": True}}, r"log=true needs low > 0"),
    ({"a": {"type": "categorical", "choices": []}}, r"params.a.categorical.choices = \[\]"),
    ({"a": {"type": "int", "low": 1, "high": 4, "stride": 2}}, r"params.a.int.stride = 2: unknown key"),
    ({"a": {"type": "uniform", "low": 1, "high": 4}}, r"params.a = .*does not match any of the expected tags"),
    ({}, r"params = \{\}"),
])
def test_invalid_spaces_name_the_field(params, match):
    with pytest.raises(SpaceError, match=match):
        parse_space({"params": params}, "my.yaml")


def test_unknown_space_file_lists_builtins():
    with pytest.raises(SpaceError, match="built-in spaces: .*tiny.yaml"):
        resolve_space_path("nope.yaml")


def test_optuna_samples_land_in_bounds_and_assemble_per_stage_lists():
    import optuna

    space = load_space(resolve_space_path("dyresnet_cifar.yaml"))
    dists = to_optuna_distributions(space, num_stages=3)
    assert {"model.gate_factor[0]", "model.gate_factor[2]", "optim.lr"} <= set(dists)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        t = study.ask(dists)
        values = assemble(space, t.params, 3)
        assert len(values["model.gate_factor"]) == 3
        assert all(0.15 <= g <= 1.0 for g in values["model.gate_factor"])
        assert 0.02 <= values["optim.lr"] <= 0.2 and values["model.heads"] in (1, 2, 4, 8)
        trial = apply_to_trial({"model": {"name": "dyresnet20"}}, values)
        assert trial["model"]["gate_factor"] == values["model.gate_factor"]
        assert trial["optim"]["lr"] == values["optim.lr"]
