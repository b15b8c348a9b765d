"""search.study: the study's storage, its sampler and its warm start, on real Optuna
storages (SQLite, a journal file)."""

from __future__ import annotations

from search.config import load_experiment
from search.study import StudyRef
from search.study import enqueue_warm_start
from search.study import make_sampler
from search.study import open_study
from tests.helpers import REPO

SMOKE = REPO / "experiments" / "smoke.yaml"
WARM = "warm_start=[{model.heads: 4, model.gate_factor: 0.25, model.squeeze_rate: 16}]"


def test_tpe_options_reach_the_sampler():
    exp = load_experiment(
        SMOKE, ["sampler={name: tpe, group: true, constant_liar: false, n_startup_trials: 3}"]
    )
    sampler = make_sampler(exp)
    # Private attributes: Optuna has no public getters; this checks the experiment's mapping.
    assert sampler._group and sampler._multivariate and not sampler._constant_liar
    assert sampler._n_startup_trials == 3


def test_a_journal_study_is_reopened_with_its_trials(tmp_path):
    exp = load_experiment(SMOKE, [f"storage_dir={tmp_path}"])
    ref = StudyRef(f"journal://{tmp_path / 'study.log'}", "j")
    study = open_study(exp, ref)
    study.tell(study.ask(), [0.5, 1.0])
    again = open_study(exp, ref)
    assert [t.values for t in again.trials] == [[0.5, 1.0]]
    assert again.metric_names == ["val_accuracy", "macs"]
    assert ref.references == StudyRef(ref.storage, "j.references")


def test_warm_start_points_go_into_a_new_study_only_spread_over_the_stages(tmp_path):
    exp = load_experiment(SMOKE, [f"storage_dir={tmp_path}", WARM])
    ref = StudyRef(f"sqlite:///{tmp_path / 'o.db'}", "s")
    study = open_study(exp, ref)
    enqueue_warm_start(study, exp, num_stages=3)
    (waiting,) = study.trials
    # Optuna keeps an enqueued trial's parameters in this system attribute until it is asked
    assert waiting.system_attrs["fixed_params"] == {
        "model.heads": 4,
        "model.gate_factor[0]": 0.25,
        "model.gate_factor[1]": 0.25,
        "model.gate_factor[2]": 0.25,
        "model.squeeze_rate": 16,
    }
    reopened = open_study(exp, ref)  # as at resume: the study holds trials already
    enqueue_warm_start(reopened, exp, num_stages=3)
    assert len(reopened.trials) == 1
