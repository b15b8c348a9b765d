"""An experiment file edited after launch, compared with the search as launched."""

from __future__ import annotations

import pytest
import yaml

from search.config import load_experiment
from search.edits import apply_edits
from search.edits import resolved
from search.overrides import SearchConfigError
from search.preflight import Problem
from search.state import new_state
from tests.helpers import REPO


def _launched(tmp_path):
    source = tmp_path / "exp.yaml"
    doc = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    doc["space"] = str(REPO / "spaces" / "tiny.yaml")
    source.write_text(yaml.safe_dump(doc))
    exp = load_experiment(source, ["trial.epochs=1"])
    folder = exp.experiment_dir
    state = new_state(exp, Problem(10, (1, 8, 8), 3), folder, str(source), ["trial.epochs=1"])
    return source, doc, resolved(exp, folder), state, folder


def test_an_unedited_file_changes_nothing_and_safe_edits_apply(tmp_path):
    source, doc, exp, state, folder = _launched(tmp_path)
    assert apply_edits(exp, state, folder) == exp
    source.write_text(yaml.safe_dump({**doc, "num_trials": 9, "ray": {"num_cpus": 1}}))
    edited = apply_edits(exp, state, folder)
    assert edited.num_trials == 9 and edited.ray.num_cpus == 1
    assert edited.trial == exp.trial and edited.space == exp.space


@pytest.mark.parametrize(
    "change,named",
    [
        ({"sampler": {"name": "random", "seed": 3}}, "sampler.seed: 0 -> 3"),
        ({"objectives": [{"metric": "val_accuracy"}]}, "objectives:"),
        ({"concurrency": 1}, "concurrency: 2 -> 1"),
        ({"budget": {"macs": 500000}}, "budget.macs: None -> 500000"),
    ],
)
def test_other_edits_are_refused_and_named(tmp_path, change, named):
    source, doc, exp, state, folder = _launched(tmp_path)
    source.write_text(yaml.safe_dump({**doc, **change}))
    with pytest.raises(SearchConfigError, match="was edited since the launch") as err:
        apply_edits(exp, state, folder)
    assert named in str(err.value) and "--set name=smoke-2" in str(err.value)


def test_the_launch_overrides_still_apply_and_a_gone_file_means_as_launched(tmp_path):
    source, doc, exp, state, folder = _launched(tmp_path)
    source.write_text(yaml.safe_dump({**doc, "trial": {**doc["trial"], "epochs": 7}}))
    assert apply_edits(exp, state, folder) == exp  # --set trial.epochs=1 wins, as at launch
    source.unlink()
    assert apply_edits(exp, state, folder) == exp


def test_a_search_launched_from_something_else_than_its_file_is_not_compared(tmp_path):
    from search.edits import launched_from

    source, doc, exp, state, folder = _launched(tmp_path)
    assert launched_from(exp, str(source), ["trial.epochs=1"], folder) == str(source)
    other = exp.model_copy(update={"num_trials": 99})  # e.g. built by a script, not the file
    assert launched_from(other, str(source), ["trial.epochs=1"], folder) is None
