"""End to end on a real local Ray cluster (2 CPUs), a real SQLite MLflow store and a real
SQLite Optuna study: a 5-trial search on digits."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import optuna
import pytest

from search.config import load_experiment
from search.launch import launch
from search.overrides import SearchConfigError
from search.state import SearchState
from search.tracking import tracking_uri
from tests.helpers import REPO
from tests.search.helpers import brute_force_front
from tests.search.helpers import children

pytestmark = pytest.mark.e2e
SMOKE = str(REPO / "experiments" / "smoke.yaml")


def test_small_search_end_to_end(ray_2cpu, tmp_path, mlflow_db):
    uri = mlflow_db
    exp = load_experiment(
        REPO / "experiments" / "smoke.yaml",
        [
            f"storage_dir={tmp_path}",
            f"mlflow.tracking_uri={uri}",
            "references={dense: true, static_group: [0.5]}",
        ],
    )
    assert launch(exp, str(REPO / "experiments" / "smoke.yaml")) == 0

    parent, kids = children(uri, "smoke")
    assert parent.info.status == "FINISHED" and len(kids) == 7  # 5 sampled + 2 references
    refs = {k.data.tags["reference"]: k for k in kids if "reference" in k.data.tags}
    assert set(refs) == {"dense", "group-0.5"}
    assert refs["dense"].data.params["model.name"] == "resnet8"
    assert refs["group-0.5"].data.params["model.name"] == "gcresnet8"
    assert refs["group-0.5"].data.params["model.gate_factor"] == "0.5"
    assert refs["dense"].info.run_name == "ref-dense" and "pareto_rank" in refs["dense"].data.tags
    client = mlflow.MlflowClient(uri)
    for k in kids:
        assert k.info.status == "FINISHED"
        assert len(client.get_metric_history(k.info.run_id, "val_accuracy")) == 2
        assert {"model.heads", "model.gate_factor", "model.squeeze_rate"} <= set(k.data.params)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "pareto.png",
        "pareto.html",
        "pareto.md",
        "experiment.resolved.yaml",
        "smoke.yaml",
    } <= artifacts

    tagged = {k.info.run_id for k in kids if k.data.tags["pareto"] == "true"}
    assert tagged == brute_force_front(kids)
    _check_hypervolume(client, parent, kids)

    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    versions = client.search_model_versions("name = 'smoke'")
    assert len(versions) == len(tagged)
    for k in kids:
        if k.info.run_id in tagged:
            alias = client.get_run(k.info.run_id).data.tags["registered_alias"]
            with tracking_uri(uri):
                model = mlflow.pytorch.load_model(f"models:/smoke@{alias}", map_location="cpu")
            assert model(__import__("torch").from_numpy(x)).shape == (5, 10)

    _check_export(uri, f"models:/smoke@{alias}", tmp_path / "export", x)

    state = SearchState.load(tmp_path / "smoke")
    study = optuna.load_study(study_name="smoke", storage=state.optuna_storage)
    refs_study = optuna.load_study(study_name="smoke.references", storage=state.optuna_storage)
    assert not any("reference" in t.user_attrs for t in study.trials)  # points of the space
    done = [
        t for t in study.trials + refs_study.trials if t.state == optuna.trial.TrialState.COMPLETE
    ]
    assert len(done) == 7
    assert {t.user_attrs["ray_trial_id"] for t in done} == {
        k.data.tags["ray_trial_id"] for k in kids
    }
    by_trial = {k.data.tags["ray_trial_id"]: k for k in kids}
    for t in done:  # optuna-dashboard's user attributes lead to the MLflow run
        k = by_trial[t.user_attrs["ray_trial_id"]]
        assert t.user_attrs["mlflow_run_id"] == k.info.run_id
        assert t.user_attrs["label"] == k.info.run_name
        assert t.user_attrs["operator"] == k.data.tags["operator"]
    from optuna_dashboard import get_note

    for s in (study, refs_study):  # the front and the link to it, on each study's note
        assert f"smoke@{alias}" in get_note(s) and "viewStateShareKey=front-" in get_note(s)
        for t in s.get_trials(states=[optuna.trial.TrialState.COMPLETE]):  # each trial's note
            run_id = t.user_attrs["mlflow_run_id"]
            note = get_note(optuna.Trial(s, t._trial_id))
            assert f"MLflow run `{run_id}`" in note
            if run_id in tagged:  # on the front: its model
                registered = client.get_run(run_id).data.tags["registered_alias"]
                assert "is on the Pareto front" in note and f"smoke@{registered}" in note
            else:
                assert "Pareto rank" in note
    sampled = [k for k in kids if "reference" not in k.data.tags]
    assert {t.number for t in done if "reference" not in t.user_attrs} == {
        int(k.data.tags["optuna_trial"]) for k in sampled
    }
    for t in done:  # references are flagged, have no parameters, and carry their objectives
        if "reference" in t.user_attrs:
            k = refs[t.user_attrs["reference"]]
            assert t.params == {} and t.values == [
                k.data.metrics["val_accuracy"],
                k.data.metrics["macs"],
            ]


def _check_hypervolume(client, parent, kids):
    """The parent run's hypervolume after each trial equals an independent computation over
    the child runs as they ended (searched trials only; references are yardsticks)."""
    import json

    reference = json.loads(parent.data.params["hypervolume_reference"])
    ref_acc, ref_macs = reference["val_accuracy"], reference["macs"]
    assert ref_acc == 0.0 and ref_macs > 0

    def area(points):  # a literal sweep over the 2-D front, independent of moocore
        inside = sorted((m, a) for a, m in points if a > ref_acc and m < ref_macs)
        total, best = 0.0, ref_acc
        for i, (m, a) in enumerate(inside):
            best = max(best, a)
            right = inside[i + 1][0] if i + 1 < len(inside) else ref_macs
            total += (right - m) * (best - ref_acc)
        return total / (ref_macs * (1 - ref_acc))

    history = {
        name: sorted(client.get_metric_history(parent.info.run_id, name), key=lambda m: m.step)
        for name in ("hypervolume", "epochs_spent", "hypervolume_by_epochs")
    }

    def last_result_ms(k):  # when the trial reported its last epoch, then ended
        return max(m.timestamp for m in client.get_metric_history(k.info.run_id, "val_accuracy"))

    ended = sorted(kids, key=last_result_ms)  # (end_time moves when a front model is logged)
    assert [m.step for m in history["hypervolume"]] == list(range(1, len(kids) + 1))
    spent = [m.value for m in history["epochs_spent"]]  # ended trials' and those in flight
    assert spent == sorted(spent) and spent[-1] == 14  # 7 trials of 2 epochs
    assert all(2 * i <= s <= 2 * i + 2 for i, s in enumerate(spent, 1))  # 1 other in flight
    by_epochs = history["hypervolume_by_epochs"]
    assert [m.step for m in by_epochs] == spent
    assert [m.value for m in by_epochs] == [m.value for m in history["hypervolume"]]
    for i, logged in enumerate(history["hypervolume"]):
        searched = [k for k in ended[: i + 1] if "reference" not in k.data.tags]
        points = [(k.data.metrics["val_accuracy"], k.data.metrics["macs"]) for k in searched]
        assert logged.value == pytest.approx(area(points), rel=1e-9)
    assert history["hypervolume"][-1].value > 0


def _check_export(uri, source, out, x):
    import json

    import torch

    import dgc
    from search.commands import export_command

    assert export_command(source, str(out), uri) == 0
    meta = json.loads((out / "model.json").read_text())
    model = dgc.create_model(
        meta["name"], num_classes=meta["num_classes"], in_chans=meta["in_chans"], **meta["kwargs"]
    ).eval()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        torch.testing.assert_close(model(torch.from_numpy(x)), scripted(torch.from_numpy(x)))


def test_pareto_by_parent_run_id_is_idempotent(ray_2cpu, tmp_path, capsys, monkeypatch, mlflow_db):
    from search.commands import pareto_command

    uri = mlflow_db
    monkeypatch.chdir(tmp_path)  # a relative storage_dir, resolved here at launch
    exp = load_experiment(
        SMOKE, ["storage_dir=runs", f"mlflow.tracking_uri={uri}", "num_trials=3", "trial.epochs=1"]
    )
    assert launch(exp, SMOKE) == 0
    parent, kids = children(uri, "smoke")
    versions = len(mlflow.MlflowClient(uri).search_model_versions("name = 'smoke'"))
    (tmp_path / "runs" / "smoke" / "pareto.md").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert pareto_command(parent.info.run_id, True, uri) == 0
    assert "| trial |" in capsys.readouterr().out
    assert (tmp_path / "runs" / "smoke" / "pareto.md").is_file()  # written to the search folder
    assert not (elsewhere / "runs").exists()
    assert len(mlflow.MlflowClient(uri).search_model_versions("name = 'smoke'")) == versions
    assert len(children(uri, "smoke")[1]) == len(kids) == 3
    # Without --tracking-uri, from a folder that holds no store: a clear error, and no empty
    # mlflow.db left behind.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SearchConfigError, match="no MLflow store at"):
        pareto_command(parent.info.run_id, False)
    assert not (elsewhere / "mlflow.db").exists()
    # A moved copy of the search folder: pareto writes into the copy, where it says it does.
    moved = tmp_path / "moved" / "smoke"
    shutil.copytree(tmp_path / "runs" / "smoke", moved)
    (moved / "pareto.md").unlink()
    assert pareto_command(str(moved), False, uri) == 0
    assert (moved / "pareto.md").is_file()
    assert f"plot: {moved / 'pareto.png'}" in capsys.readouterr().out


def test_a_search_whose_every_trial_fails_exits_nonzero_and_records_failures(
    ray_2cpu, tmp_path, mlflow_db
):
    uri = mlflow_db
    exp = load_experiment(
        REPO / "experiments" / "smoke.yaml",
        [
            f"storage_dir={tmp_path}",
            f"mlflow.tracking_uri={uri}",
            "num_trials=2",
            "trial.epochs=1",
            "trial.optim.lr=1.0e+30",
            "max_failures=2",
        ],
    )
    assert launch(exp, SMOKE) == 1
    parent, kids = children(uri, "smoke")
    assert parent.info.status == "FAILED"
    assert len(kids) == 2 and all(k.info.status == "FAILED" for k in kids)
    assert all("val_accuracy" not in k.data.metrics for k in kids)  # no fake scores
    client = mlflow.MlflowClient(uri)
    for k in kids:  # the error text itself, not a path into Ray's temporary session folder
        text = open(client.download_artifacts(k.info.run_id, "error.txt", str(tmp_path))).read()
        assert "NonFiniteLossError" in text and "NonFiniteLossError" in k.data.tags["error"]
        assert "error_file" not in k.data.tags
    state = SearchState.load(tmp_path / "smoke")
    study = optuna.load_study(study_name="smoke", storage=state.optuna_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    # A non-finite loss is deterministic: reported, not raised, so Tune saw no error to retry
    # (max_failures=2) ...
    assert not list((tmp_path / "smoke" / "tune").rglob("error.pkl"))
    # ... and resume does not run these trials again.
    from search.launch import resume

    ended = {k.info.run_id: k.info.end_time for k in kids}
    assert resume(tmp_path / "smoke") == 1
    _, again = children(uri, "smoke")
    assert {k.info.run_id: k.info.end_time for k in again} == ended
    assert len(optuna.load_study(study_name="smoke", storage=state.optuna_storage).trials) == 2


def test_resume_when_tune_never_saved_its_state(ray_2cpu, tmp_path, mlflow_db):
    from search.launch import resume

    uri = mlflow_db
    exp = load_experiment(
        SMOKE,
        [f"storage_dir={tmp_path}", f"mlflow.tracking_uri={uri}", "num_trials=2", "trial.epochs=1"],
    )
    assert launch(exp, SMOKE) == 0
    folder = tmp_path / "smoke"
    shutil.rmtree(folder / "tune")
    # Finished trials in the study but no Tune state: damaged, said so, nothing deleted.
    with pytest.raises(SearchConfigError, match="Tune's state is missing but the study has"):
        resume(folder)
    # A launch that stopped before Tune saved anything (no trial finished): resume runs it.
    (folder / "optuna.db").unlink()
    assert resume(folder) == 0
    state = SearchState.load(folder)
    study = optuna.load_study(study_name="smoke", storage=state.optuna_storage)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2
    parent, _ = children(uri, "smoke")
    assert parent.info.status == "FINISHED"


def test_pretrained_dense_network_is_trained_once_and_survives_resume(
    ray_2cpu, tmp_path, mlflow_db
):
    from search.launch import resume

    uri = mlflow_db
    exp = load_experiment(
        SMOKE,
        [
            f"storage_dir={tmp_path}",
            f"mlflow.tracking_uri={uri}",
            "num_trials=2",
            "trial.epochs=1",
            "pretrain={epochs: 2}",
            "trial.distill={weight: 0.5}",  # the pretrained network also teaches
            "references={dense: false, static_group: [0.5]}",
            "mlflow.register_models=false",
        ],
    )
    assert launch(exp, SMOKE) == 0
    folder = tmp_path / "smoke"
    weights = folder / "pretrain.pt"
    first = weights.read_bytes()
    parent, kids = children(uri, "smoke")
    # the search's compute: 2 pretraining epochs, 1 epoch for each of 2 trials and 1 reference
    assert parent.data.metrics["compute_epochs"] == 2 + 3
    pre = [k for k in kids if "pretrain" in k.data.tags]
    assert len(pre) == 1 and pre[0].info.run_name == "pretrain-dense"
    assert pre[0].data.params["model.name"] == "resnet8" and pre[0].data.metrics["epoch"] == 2
    assert "pareto" not in pre[0].data.tags  # the starting point, never a candidate
    trials = [k for k in kids if "pretrain" not in k.data.tags and "reference" not in k.data.tags]
    assert len(trials) == 2
    assert all(k.data.params["init_from"] == str(weights) for k in trials)
    assert all(k.data.params["distill.teacher"] == "None" for k in trials)  # init_from teaches
    refs = {k.data.params["model.name"]: k for k in kids if "reference" in k.data.tags}
    assert refs["gcresnet8"].data.params["init_from"] == "None"  # the baseline starts fresh
    # ... and learns from the same teacher as the trials
    assert all(r.data.params["distill.teacher"] == str(weights) for r in refs.values())

    # The driver died after the pretraining finished but before its weights were copied out:
    # resume takes them from the finished Tune run, trains nothing again.
    weights.unlink()
    assert resume(folder) == 0
    assert weights.read_bytes() == first
    _, again = children(uri, "smoke")
    assert [k.info.run_id for k in again if "pretrain" in k.data.tags] == [pre[0].info.run_id]
    client = mlflow.MlflowClient(uri)
    assert len(client.get_metric_history(pre[0].info.run_id, "epoch")) == 2


def test_the_search_pretraining_config_is_a_valid_dense_trial():
    from search.pretrain import pretrain_config
    from trainables.config import TrialConfig

    # An epochs-unit ramp longer than the pretraining: the dense trial has no gates to ramp.
    exp = load_experiment(
        SMOKE,
        [
            "trial.epochs=12",
            "pretrain={epochs: 2}",
            "trial.gate_schedule={warmup_end: 1, ramp_end: 10, unit: epochs}",
        ],
    )
    cfg = TrialConfig.model_validate(pretrain_config(exp))
    assert cfg.model.name == "resnet8" and cfg.epochs == 2 and cfg.init_from is None
    assert cfg.tags == {"pretrain": "resnet8"} and cfg.gate_schedule.unit == "fraction"


def test_a_search_over_operators_puts_dgc_sg_cnn_and_dynet_on_one_front(
    ray_2cpu, tmp_path, mlflow_db
):
    """The shipped operator experiment: its three warm-start points are one DGC, one SG-CNN and
    one DyNet network, plus the dense reference."""
    path = REPO / "experiments" / "digits_operators.yaml"
    uri = mlflow_db
    exp = load_experiment(
        path,
        [
            f"storage_dir={tmp_path}",
            f"mlflow.tracking_uri={uri}",
            "trial.data.batch_size=128",
            "trial.epochs=2",
            "num_trials=3",
            "references={dense: true}",
            "ray={dashboard: false, num_cpus: 2}",
            "mlflow.register_models=false",
        ],
    )
    assert launch(exp, str(path)) == 0
    _, kids = children(uri, "digits_operators")
    by_op = {k.data.tags["operator"]: k for k in kids}
    assert set(by_op) == {"dense", "dynamic", "selfgroup", "dynet"}
    assert all(k.info.status == "FINISHED" for k in kids)
    sg = by_op["selfgroup"].data
    assert sg.params["model.compression"] == "0.5" and sg.params["model.heads"] == "None"
    assert sg.metrics["macs"] <= sg.metrics["target_macs"]  # realised after the last step
    history = mlflow.MlflowClient(uri).get_metric_history(by_op["selfgroup"].info.run_id, "macs")
    assert history[-1].value == sg.metrics["macs"]
    assert by_op["dynet"].data.params["model.kernels"] == "4"
    assert {k.info.run_id for k in kids if k.data.tags["pareto"] == "true"} == brute_force_front(
        kids
    )
    html = (tmp_path / "digits_operators" / "pareto.html").read_text()
    assert all(f"trials: {n}" in html or n in html for n in ("DGC", "SG-CNN", "DyNet"))
    state = SearchState.load(tmp_path / "digits_operators")
    study = optuna.load_study(study_name="digits_operators", storage=state.optuna_storage)
    params = {t.params.get("model.name"): set(t.params) for t in study.trials if t.params}
    assert params["sgresnet8"] == {"model.name", "model.compression", "model.sg_groups"}


def test_a_search_that_trains_nothing_exits_nonzero(ray_2cpu, tmp_path, mlflow_db):
    """Two searches share one Optuna study (``optuna_storage``) over a one-point space: the
    second finds its only point trained, trains nothing, says so and exits 1."""
    uri = mlflow_db
    sets = [
        f"mlflow.tracking_uri={uri}",
        f"optuna_storage=sqlite:///{tmp_path / 'shared.db'}",
        "num_trials=2",
        "trial.epochs=1",
        "mlflow.register_models=false",
        "space={params: {model.heads: {type: categorical, choices: [4]}}}",
    ]
    first = load_experiment(SMOKE, [f"storage_dir={tmp_path / 'a'}", *sets])
    assert launch(first, SMOKE) == 0
    second = load_experiment(SMOKE, [f"storage_dir={tmp_path / 'b'}", *sets])
    assert launch(second, SMOKE) == 1
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("smoke").experiment_id
    parents = client.search_runs(
        [exp_id], "tags.`dgc_search.kind` = 'search'", order_by=["attributes.start_time ASC"]
    )
    assert [p.info.status for p in parents] == ["FINISHED", "FAILED"]
    kids = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parents[1].info.run_id}'")
    assert kids == []
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 1  # trained once, never again
    assert len(states) <= 1 + 2 * 100  # duplicates are refused, not trained, and bounded
