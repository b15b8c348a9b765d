from __future__ import annotations

from pathlib import Path

import torch

from trainables import metrics as M
from trainables.config import DataParams
from trainables.data import load_splits
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
