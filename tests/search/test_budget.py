"""Budgets that end a search: what is spent, what validate says they buy, and a real search on
a local Ray cluster stopped by its epoch budget, resumed to the same budget, then to a raised
one."""

from __future__ import annotations

import optuna
import pytest
import yaml

from search.budget import Budget
from search.budget import describe_budget
from search.config import StopConfig
from search.config import load_experiment
from search.interrupt import Stop
from search.tune_runs import TrialRecord
from search.tune_runs import all_records
from search.watch import Ledger
from tests.helpers import REPO
from tests.search.helpers import children

SMOKE = REPO / "experiments" / "smoke.yaml"
ACC_MACS = [("val_accuracy", "max"), ("macs", "min")]


def test_the_epoch_budget_counts_every_trials_epochs_and_the_time_budget_every_command(tmp_path):
    ledger = Ledger(ACC_MACS, None, 4).seed(
        [TrialRecord("a", "TERMINATED", {"epoch": 4}), TrialRecord("b", "PAUSED", {"epoch": 2})]
    )
    budget = Budget(StopConfig(epochs=7), ledger, tmp_path)
    assert budget.spent() is None
    ledger.trained("c", {"epoch": 1})
    assert budget.spent() == "stop.epochs=7 (7 trial epochs trained)"
    (tmp_path / "spent.json").write_text('{"seconds": 3599.5}')
    timed = Budget(StopConfig(time="1h"), ledger, tmp_path)
    assert timed.spent() is None or timed.seconds >= 3600
    timed.before_s = 3600.0
    assert timed.spent() is not None and timed.spent().startswith("stop.time=1h (1.00 h")
    timed.save(force=True)
    assert Budget(StopConfig(), ledger, tmp_path).before_s >= 3600.0


def test_a_spent_budget_drains_but_is_no_interruption():
    stop = Stop()
    stop.spend("stop.epochs=5")
    assert stop.requested and stop.draining and not stop.interrupted
    stop.spend("stop.time=1h")  # the first reason stays
    assert stop.budget == "stop.epochs=5"


def test_validate_says_what_the_budget_buys():
    exp = load_experiment(SMOKE, ["stop={epochs: 9, time: 90m}", "trial.epochs=3"])
    lines = describe_budget(exp)
    assert lines[0].startswith("stop.epochs=9 buys about 3.0 full trials of 3 epochs")
    assert "would take 15" in lines[0]
    assert lines[1].startswith("stop.time=90m ends the search after 1.5 h")
    assert describe_budget(load_experiment(SMOKE)) == []


def _spent(folder):
    return sum(int(r.metrics.get("epoch", 0)) for r in all_records(folder))


@pytest.mark.e2e
def test_an_epoch_budget_stops_the_search_and_resume_keeps_to_it(ray_2cpu, tmp_path, mlflow_db):
    """2 trials at a time, 3 epochs each, 20 trials allowed, 4 epochs of budget: the result
    that spends the budget (an epoch 2) pauses its own trial; the other trial in flight trains
    at most one more epoch. So the search stops with at most 4 + 1 epochs spent and at least
    one trial paused, ranks its front and exits 0; resume with the same budget trains nothing;
    a raised budget continues the paused trials to their last epoch."""
    from search.launch import launch
    from search.launch import resume

    uri = mlflow_db
    doc = yaml.safe_load(SMOKE.read_text())
    doc.update(name="budget", num_trials=20, stop={"epochs": 4}, storage_dir=str(tmp_path))
    doc["trial"]["epochs"] = 3
    doc["mlflow"] = {"tracking_uri": uri, "register_models": False}
    source = tmp_path / "budget.yaml"
    source.write_text(yaml.safe_dump(doc))
    folder = tmp_path / "budget"

    assert launch(load_experiment(source), str(source)) == 0
    first = _spent(folder)
    assert 4 <= first <= 4 + 1
    records = all_records(folder)
    paused = {r.trial_id for r in records if r.status == "PAUSED"}
    assert paused and all(r.status in ("TERMINATED", "PAUSED") for r in records)
    parent, kids = children(uri, "budget")
    assert parent.info.status == "FINISHED" and len(kids) == len(records) <= 3
    for k in kids:
        assert k.data.tags["status"] == ("paused" if k.data.tags["ray_trial_id"] in paused
                                         else "finished")  # fmt: skip
    study = optuna.load_study(study_name="budget", storage=f"sqlite:///{folder / 'optuna.db'}")
    running = {t.user_attrs["ray_trial_id"] for t in study.trials if not t.state.is_finished()}
    assert running == paused  # not FAILed: a raised budget continues them

    assert resume(folder) == 0  # the same budget: spent already, nothing trains
    assert _spent(folder) == first

    more = sum(3 - r.metrics["epoch"] for r in records if r.trial_id in paused)
    source.write_text(yaml.safe_dump({**doc, "stop": {"epochs": first + more}}))
    assert resume(folder) == 0
    again = {r.trial_id: r for r in all_records(folder)}
    assert all(again[t].status == "TERMINATED" and again[t].metrics["epoch"] == 3 for t in paused)
    assert first + more <= _spent(folder) <= first + more + 1
