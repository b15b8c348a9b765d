"""What a search has spent and how good its front is, as its trials report (in the driver).

``Ledger`` counts the epochs every trial trained (references included; a trial resumed from a
checkpoint goes on from its epoch) and the trials that ended, seeded from Tune's saved records
so that a resumed search goes on counting, and keeps the searched trials' objective values.
``WatchCallback`` keeps it up to date and, after every trial that ends, logs to the parent run
the front's hypervolume (step: trials ended), the epochs spent (step: trials ended) and the
hypervolume again against the epochs spent (step: epochs), so MLflow's chart view draws the
search's progress while it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any

from ray.tune import Callback

from search import names as N
from search.hypervolume import EPOCHS_SPENT
from search.hypervolume import HYPERVOLUME
from search.hypervolume import HYPERVOLUME_BY_EPOCHS
from search.hypervolume import hypervolume
from search.scheduler import stopped_at
from trainables import metrics as M

if TYPE_CHECKING:
    from search.tracking_queue import TrackingQueue
    from search.tune_runs import TrialRecord


@dataclass
class Ledger:
    """Epochs per trial, trials ended, the searched front's candidates and its hypervolume."""

    objectives: list[tuple[str, str]]
    reference: list[float] | None
    full_epochs: int  # a trial's epochs (trial.epochs), unless its config says otherwise
    epochs: dict[str, int] = field(default_factory=dict)  # Ray trial id -> epochs trained
    ended: set[str] = field(default_factory=set)
    values: list[tuple[float, ...]] = field(default_factory=list)

    @property
    def epochs_spent(self) -> int:
        return sum(self.epochs.values())

    def seed(self, records: list[TrialRecord]) -> Ledger:
        """What earlier commands of the search spent and found (Tune's saved records)."""
        for r in records:
            self.trained(r.trial_id, r.metrics)
            if r.status in ("TERMINATED", "ERROR"):
                self.end(r.trial_id, r.metrics if r.status == "TERMINATED" else None, r.tags)
        return self

    def trained(self, trial_id: str, result: dict[str, Any]) -> None:
        epoch = result.get(M.EPOCH)
        if isinstance(epoch, (int, float)):
            self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(epoch))

    def end(self, trial_id: str, result: dict[str, Any] | None, tags: dict[str, Any]) -> None:
        """A trial ended (``result``: its last, None if it failed)."""
        if trial_id in self.ended:
            return
        self.ended.add(trial_id)
        values = self._candidate(result or {}, tags)
        if values is not None:
            self.values.append(values)

    def _candidate(self, result: dict[str, Any], tags: dict[str, Any]) -> tuple[float, ...] | None:
        """A searched trial's objectives, if it trained to its last epoch and reported them."""
        if M.TRIAL_ERROR in result or tags.get(N.REFERENCE_TAG) or tags.get(N.PRETRAIN_TAG):
            return None
        config = result.get("config")
        epochs = config.get("epochs") if isinstance(config, dict) else None
        if stopped_at(result, int(epochs or self.full_epochs)) is not None:
            return None  # stopped early by the scheduler: never on the front
        values = [result.get(m) for m, _ in self.objectives]
        if not all(isinstance(v, (int, float)) for v in values):
            return None
        return tuple(float(v) for v in values)  # type: ignore[arg-type]

    def hypervolume(self) -> float | None:
        if self.reference is None:
            return None
        return hypervolume(self.values, self.objectives, self.reference)


class WatchCallback(Callback):
    """Keeps the ledger (listed before the callbacks that read it) and logs the front's
    hypervolume to the parent run after every trial that ends."""

    def __init__(self, ledger: Ledger, writes: TrackingQueue, parent_run_id: str) -> None:
        self.ledger: Ledger | None = ledger
        self.writes, self.parent_run_id = writes, parent_run_id

    def __getstate__(self) -> dict[str, Any]:
        return {"ledger": None, "writes": None, "parent_run_id": ""}  # a restore gets a new one

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if self.ledger is not None:
            self.ledger.trained(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, trial.last_result or {})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, None)

    def _ended(self, trial: Any, result: dict[str, Any] | None) -> None:
        ledger = self.ledger
        if ledger is None or trial.trial_id in ledger.ended:
            return
        if result is not None:
            result = {**result, "config": trial.config}
        ledger.end(trial.trial_id, result, trial.config.get("tags", {}))
        volume = ledger.hypervolume()
        if volume is None:
            return
        ts, ended, spent = int(time.time() * 1000), len(ledger.ended), ledger.epochs_spent
        metrics = [
            [HYPERVOLUME, volume, ts, ended],
            [EPOCHS_SPENT, spent, ts, ended],
            [HYPERVOLUME_BY_EPOCHS, volume, ts, spent],
        ]
        self.writes.put({"op": "parent_metrics", "run": self.parent_run_id, "metrics": metrics})
