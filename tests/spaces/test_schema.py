from __future__ import annotations

import pytest

from spaces.convert import apply_to_trial
from spaces.convert import assemble
from spaces.convert import suggest
from spaces.load import SpaceError
from spaces.load import builtin_spaces
from spaces.load import load_space
from spaces.load import parse_space
from spaces.load import resolve_space_path


@pytest.mark.parametrize("name", builtin_spaces())
def test_every_shipped_space_loads(name):
    space = load_space(resolve_space_path(name))
    assert space.params


@pytest.mark.parametrize(
    "params,match",
    [
        (
            {"a": {"type": "float", "low": 2, "high": 1}},
            r"my.yaml: params.a.float: low=2.0 > high=1.0; swap them",
        ),
        ({"a": {"type": "float", "low": 0, "high": 1, "log": True}}, r"log=true needs low > 0"),
        ({"a": {"type": "categorical", "choices": []}}, r"params.a.categorical.choices = \[\]"),
        (
            {"a": {"type": "int", "low": 1, "high": 4, "stride": 2}},
            r"params.a.int.stride = 2: unknown key",
        ),
        (
            {"a": {"type": "uniform", "low": 1, "high": 4}},
            r"params.a = .*does not match any of the expected tags",
        ),
        ({}, r"params = \{\}"),
    ],
)
def test_invalid_spaces_name_the_field(params, match):
    with pytest.raises(SpaceError, match=match):
        parse_space({"params": params}, "my.yaml")


def test_unknown_space_file_lists_builtins():
    with pytest.raises(SpaceError, match="built-in spaces: .*tiny.yaml"):
        resolve_space_path("nope.yaml")


def test_optuna_samples_land_in_bounds_and_assemble_per_stage_lists():
    import optuna

    space = load_space(resolve_space_path("dyresnet_cifar.yaml"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        t = study.ask()
        suggest(t, space, 3)
        assert {"model.gate_factor[0]", "model.gate_factor[2]", "optim.lr"} <= set(t.params)
        values = assemble(space, t.params, 3)
        assert len(values["model.gate_factor"]) == 3
        assert all(0.15 <= g <= 1.0 for g in values["model.gate_factor"])
        assert 0.02 <= values["optim.lr"] <= 0.2 and values["model.heads"] in (1, 2, 4, 8)
        trial = apply_to_trial({"model": {"name": "dyresnet20"}}, values)
        assert trial["model"]["gate_factor"] == values["model.gate_factor"]
        assert trial["optim"]["lr"] == values["optim.lr"]


OPERATORS = {
    "model.name": {"type": "categorical", "choices": ["dyresnet8", "sgresnet8", "dnresnet8"]},
    "model.gate_factor": {
        "type": "float",
        "low": 0.2,
        "high": 0.8,
        "when": {"model.name": ["dyresnet8"]},
    },
    "model.compression": {
        "type": "float",
        "low": 0.3,
        "high": 0.8,
        "per_stage": True,
        "when": {"model.name": ["sgresnet8"]},
    },
    "model.kernels": {"type": "int", "low": 2, "high": 5, "when": {"model.name": ["dnresnet8"]}},
    "optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
}


def test_conditional_parameters_are_sampled_define_by_run_only_when_active():
    import optuna

    space = parse_space({"params": OPERATORS}, "ops.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = suggest(trial, space, 3)
        assert values == trial.params
        name = values["model.name"]
        seen.add(name)
        own = {
            "dyresnet8": {"model.gate_factor"},
            "dnresnet8": {"model.kernels"},
            "sgresnet8": {f"model.compression[{i}]" for i in range(3)},
        }[name]
        assert set(values) == {"model.name", "optim.lr"} | own
        point = assemble(space, values, 3)
        assert set(point) == {"model.name", "optim.lr"} | {k.split("[")[0] for k in own}
        study.tell(trial, 0.0)
    assert seen == {"dyresnet8", "sgresnet8", "dnresnet8"}
    # Optuna records each conditional parameter only on the trials that sampled it.
    dist = {t.params.get("model.name"): set(t.distributions) for t in study.trials}
    assert "model.kernels" in dist["dnresnet8"] and "model.kernels" not in dist["dyresnet8"]


@pytest.mark.parametrize(
    "when,match",
    [
        (
            {"model.lr": ["x"]},
            r"params.b.when.model.lr: 'model.lr' is not a parameter listed before 'b'",
        ),
        (
            {"a": ["nope"]},
            r"params.b.when.a: \['nope'\] must be a non-empty list of choices of 'a'",
        ),
        ({"a": []}, r"must be a non-empty list of choices"),
        ({"c": [1]}, r"'c' is not a parameter listed before 'b'"),
    ],
)
def test_bad_conditions_name_the_parameter_and_the_rule(when, match):
    params = {
        "a": {"type": "categorical", "choices": ["x", "y"]},
        "b": {"type": "float", "low": 0, "high": 1, "when": when},
        "c": {"type": "categorical", "choices": [1, 2]},
    }
    with pytest.raises(SpaceError, match=match):
        parse_space({"params": params}, "my.yaml")


def test_a_condition_on_a_numeric_parameter_is_refused():
    params = {
        "a": {"type": "float", "low": 0, "high": 1},
        "b": {"type": "float", "low": 0, "high": 1, "when": {"a": [0.5]}},
    }
    with pytest.raises(SpaceError, match="'a' must be a categorical parameter"):
        parse_space({"params": params}, "my.yaml")
