"""``pretrain``: the dense network of the searched family, trained once per search (a Tune run
of one trial in ``<folder>/pretrain``, tracked as the MLflow child run ``pretrain-dense``, never
ranked), then the starting point of every searched trial (``trial.init_from``). A search resumed
before it finished continues it from its last checkpoint; once ``pretrain.pt`` exists it is
never trained again."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from search import names as N
from search.config import ExperimentConfig
from search.tune_runs import Parts
from search.tune_runs import restore
from trainables import metrics as M
from trainables.runner import STATE_FILE
from trainables.runner import dense_start_config

log = logging.getLogger(__name__)

WEIGHTS = "pretrain.pt"
TUNE_NAME = "pretrain"


def with_init(exp: ExperimentConfig, folder: Path) -> ExperimentConfig:
    """The experiment whose trials start from the search's pretrained network, if it has one."""
    if exp.pretrain is None:
        return exp
    trial = exp.trial.model_copy(update={"init_from": str(folder / WEIGHTS)})
    return exp.model_copy(update={"trial": trial})


def pretrain_config(exp: ExperimentConfig) -> dict[str, Any]:
    """The dense network's trial: the trial recipe, its own epochs, no init, tagged."""
    assert exp.pretrain is not None
    config = dense_start_config(exp.trial, exp.pretrain.epochs).model_dump(mode="json")
    config["tags"] = {N.PRETRAIN_TAG: config["model"]["name"]}
    return config


def run_config(exp: ExperimentConfig, folder: Path, name: str, callbacks: list) -> Any:
    """Tune's RunConfig of the search's Tune runs: under ``folder/name``, quiet, the
    experiment's retries, the last checkpoint of each trial kept."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=str(folder),
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=exp.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=callbacks,
    )


def ensure_pretrained(exp: ExperimentConfig, folder: Path, parts: Parts, trainable: Any) -> bool:
    """Train (or finish training) the dense network unless ``<folder>/pretrain.pt`` exists.
    Returns False if a stop ended the run first (its state is saved: resume continues it).

    Raises:
        RuntimeError: the pretraining failed (its MLflow run holds the error).
    """
    from ray import tune

    target = folder / WEIGHTS
    if exp.pretrain is None or target.is_file():
        return True
    path = folder / TUNE_NAME
    log.info("pretraining %s for %d epochs", pretrain_config(exp)["model"]["name"],
             exp.pretrain.epochs)  # fmt: skip
    if tune.Tuner.can_restore(str(path)):
        tuner = restore(path, trainable, parts)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=pretrain_config(exp),
            tune_config=tune.TuneConfig(scheduler=parts.scheduler),
            run_config=run_config(exp, folder, TUNE_NAME, parts.callbacks),
        )
    result = tuner.fit()[0]
    if parts.stop is not None and parts.stop.requested:
        return False
    done = result.metrics.get(M.EPOCH) == exp.pretrain.epochs
    if result.error is not None or result.checkpoint is None or not done:
        raise RuntimeError(
            f"pretraining the dense network failed ({str(result.error)[:300]}); see the MLflow "
            f"run pretrain-dense, then `python -m search resume {folder}`"
        )
    with result.checkpoint.as_directory() as d:
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(Path(d) / STATE_FILE, tmp)
        tmp.replace(target)
    log.info("pretrained: %s (val_accuracy %.4f)", target, result.metrics.get(M.VAL_ACCURACY, 0))
    return True
