"""``train_dgc``: the Ray Tune function trainable.

It talks to Tune only through ``ray.tune.report``, ``ray.tune.get_checkpoint`` and
``ray.tune.Checkpoint``. Every report carries the objectives (accuracy, MACs, parameters);
checkpoints hold model, optimiser, iteration, gate progress, epoch and RNG states.
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path
from typing import Any

from trainables import metrics as M
from trainables.config import TrialConfig
from trainables.data import Splits
from trainables.loop import NonFiniteLossError
from trainables.runner import STATE_FILE
from trainables.runner import load_state
from trainables.runner import run_trial
from trainables.runner import save_state


class RayReporter:
    def __init__(self, node_id: str = "") -> None:
        self.node_id = node_id

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        from ray import tune

        metrics = {**metrics, M.NODE_ID: self.node_id}  # which cluster node trained it
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(state, Path(tmp) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def train_dgc(config: dict[str, Any], splits: Splits | None = None) -> None:
    """Validate ``config`` as a TrialConfig, resume from Tune's checkpoint if any, train.

    Args:
        config: a TrialConfig as a dict (Tune's sampled configuration).
        splits: decoded dataset shipped through the object store by ``tune.with_parameters``;
            loaded from ``config["data"]`` when None.
    """
    import ray
    from ray import tune

    cfg = TrialConfig.model_validate(config)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_state(Path(d) / STATE_FILE)
    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    cpus, gpus = assigned.get("CPU", 1.0), assigned.get("GPU")
    reporter = RayReporter(context.get_node_id())
    try:
        run_trial(cfg, reporter, resume, splits, threads=max(1, int(cpus)), gpu_share=gpus)
    except NonFiniteLossError as err:  # the same on every retry: report it, do not raise
        error = {M.TRIAL_ERROR: f"{type(err).__name__}: {err}"}
        reporter.report({**error, M.TRIAL_ERROR_TEXT: traceback.format_exc()}, None)
