"""train_dgc, the Ray Tune function trainable: under a real local Ray Tune run, and in-process
with Ray's report, get_checkpoint and runtime context stubbed (its glue, quickly)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainables import metrics as M
from trainables.config import DataParams
from trainables.config import TrialConfig
from trainables.data import load_splits
from trainables.runner import build_model
from trainables.runner import save_state
from trainables.trainable import STATE_FILE
from trainables.trainable import train_dgc


def test_train_dgc_under_a_real_ray_tune_run(ray_2cpu, tmp_path):
    from ray import tune

    splits = load_splits(DataParams(val_size=300))
    space = {
        "epochs": 2,
        "seed": 0,
        "checkpoint_every": 1,
        "model": {"name": "dyresnet8", "gate_factor": tune.grid_search([0.25, 0.5])},
        "data": {"batch_size": 64, "val_size": 300},
        "optim": {"lr": 0.05},
    }
    trainable = tune.with_resources(tune.with_parameters(train_dgc, splits=splits), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        run_config=tune.RunConfig(
            storage_path=str(tmp_path),
            name="t",
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    results = tuner.fit()
    assert results.num_errors == 0 and len(results) == 2
    macs = set()
    for r in results:
        hist = r.metrics_dataframe
        assert list(hist[M.EPOCH]) == [1, 2]
        assert hist[M.MACS].notna().all() and hist[M.VAL_ACCURACY].notna().all()
        assert 0.0 <= r.metrics[M.TEST_ACCURACY] <= 1.0 and r.metrics[M.GATE_PROGRESS] == 1.0
        macs.add(r.metrics[M.MACS])
        with r.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
        assert state["epoch"] == 2
    assert len(macs) == 2  # the two gate factors cost differently


class FakeTune:
    """Ray Tune as the function trainable sees it, in-process: ``report`` keeps each report
    and reads its checkpoint while it exists (the trainable deletes its folder afterwards, as
    Tune has persisted it by then), ``get_checkpoint`` hands back ``resume_from``."""

    def __init__(self, resume_from: Path | None = None) -> None:
        self.resume_from = resume_from
        self.metrics: list[dict] = []
        self.states: list[dict | None] = []
        self.threads: list[int] = []

    def report(self, metrics, checkpoint=None):
        from ray import tune

        assert checkpoint is None or isinstance(checkpoint, tune.Checkpoint)
        self.metrics.append(metrics)
        self.threads.append(torch.get_num_threads())
        self.states.append(
            None
            if checkpoint is None
            else torch.load(Path(checkpoint.path) / STATE_FILE, weights_only=True)
        )

    def get_checkpoint(self):
        from ray import tune

        return (
            None if self.resume_from is None else tune.Checkpoint.from_directory(self.resume_from)
        )


class FakeContext:
    def get_assigned_resources(self):
        return {"CPU": 1.0}

    def get_node_id(self):
        return "node-a"


@contextlib.contextmanager
def fake_tune(resume_from: Path | None = None) -> Iterator[FakeTune]:
    """Ray's report, checkpoint and runtime context stubbed: no cluster, no session. Kernels
    are not timed (deterministic algorithms): this tests the glue, and quickly."""
    import ray
    from ray import tune

    fake, threads = FakeTune(resume_from), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tune, "report", fake.report)
            mp.setattr(tune, "get_checkpoint", fake.get_checkpoint)
            mp.setattr(ray, "get_runtime_context", FakeContext)
            yield fake
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)  # the trainable sets it from its CPUs


TINY = {
    "epochs": 2,
    "seed": 3,
    "model": {"name": "dyresnet8", "gate_factor": 0.5},
    "data": {"batch_size": 64, "val_size": 300, "train_subset": 512},
    "optim": {"lr": 0.05},
}


@pytest.fixture(scope="module")
def fresh() -> FakeTune:
    """What a fresh trial of TINY reported (shared: one run for the tests that read it)."""
    with fake_tune() as tune:
        train_dgc(TINY)
    return tune


def test_train_dgc_reports_metrics_and_checkpoints_to_tune_without_a_cluster(fresh):
    cfg = TrialConfig.model_validate(TINY)
    assert [m[M.EPOCH] for m in fresh.metrics] == [1, 2]
    for m, state in zip(fresh.metrics, fresh.states):
        assert m[M.NODE_ID] == "node-a" and m[M.MACS] > 0 and 0 <= m[M.VAL_ACCURACY] <= 1
        assert state is not None and state["epoch"] == m[M.EPOCH]
        assert state["config"] == cfg.model_dump(mode="json")
        assert 0 < state["gate_progress"] <= 1 and state["optimizer"]["state"]
        build_model(cfg, 10, 1).load_state_dict(state["model"])  # every weight, named as built
    assert M.TEST_ACCURACY in fresh.metrics[-1] and fresh.metrics[-1][M.GATE_PROGRESS] == 1.0
    assert fresh.threads == [1, 1]  # torch's threads: the CPUs Ray assigned


def test_train_dgc_resumes_from_tunes_checkpoint(fresh, tmp_path):
    save_state(fresh.states[0], tmp_path / STATE_FILE)  # the checkpoint after epoch 1
    with fake_tune(resume_from=tmp_path) as again:
        train_dgc(TINY)
    assert [m[M.EPOCH] for m in again.metrics] == [2]  # epoch 1 is not trained again
    assert again.states[-1]["epoch"] == 2
    assert again.states[-1]["iteration"] == fresh.states[-1]["iteration"]


def test_a_non_finite_loss_is_reported_as_the_trials_result_not_raised():
    with fake_tune() as tune:
        train_dgc({**TINY, "optim": {"lr": 1e30}})
    last = tune.metrics[-1]
    assert last[M.TRIAL_ERROR].startswith("NonFiniteLossError")
    assert "Traceback" in last[M.TRIAL_ERROR_TEXT] and tune.states[-1] is None
