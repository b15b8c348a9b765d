"""Budgets that end a search besides ``num_trials``: trial epochs and wall-clock time
(``stop: {epochs: N, time: "8h"}`` in the experiment file).

The epochs are those every trial trained, references included (``search.watch.Ledger``, seeded
from Tune's records, so a resumed search goes on counting); the time is the wall-clock time of
every launch and resume of the search together, kept in ``<folder>/spent.json``. Once either is
spent (checked by ``DrainScheduler`` on every result, so the result that spends it pauses its
own trial, and by ``BudgetCallback`` as time passes), the search stops like a first Ctrl-C
does (``Stop.spend``): no trial starts, each running one stops at the end of its current epoch,
paused and resumable (raise the budget and ``resume``), and the search ranks its front and ends
(exit 0). A search spends at most its epoch budget plus one epoch of each other trial in flight
when it is reached.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from ray.tune import Callback

from search.state import write_atomic

if TYPE_CHECKING:
    from search.config import ExperimentConfig
    from search.config import StopConfig
    from search.interrupt import Stop
    from search.watch import Ledger

log = logging.getLogger(__name__)

SPENT_FILE = "spent.json"
#: how often the running command's wall-clock time is saved
SAVE_EVERY_S = 10.0


class Budget:
    """The search's budgets, what it has spent of them, and whether that is all."""

    def __init__(self, limits: StopConfig, ledger: Ledger, folder: Path) -> None:
        self.limits, self.ledger, self.folder = limits, ledger, folder
        self.before_s = _load_seconds(folder / SPENT_FILE)
        self.started = time.monotonic()
        self.saved = self.started

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of the search: earlier commands' and this one's."""
        return self.before_s + time.monotonic() - self.started

    def spent(self) -> str | None:
        """The budget that is spent (``"stop.epochs=40 (41 trial epochs trained)"``), if one
        is."""
        epochs, limit_s = self.limits.epochs, self.limits.seconds
        if epochs is not None and self.ledger.epochs_spent >= epochs:
            return f"stop.epochs={epochs} ({self.ledger.epochs_spent} trial epochs trained)"
        if limit_s is not None and self.seconds >= limit_s:
            return f"stop.time={self.limits.time} ({self.seconds / 3600:.2f} h of trials running)"
        return None

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.saved >= SAVE_EVERY_S:
            self.saved = now
            write_atomic(self.folder / SPENT_FILE, json.dumps({"seconds": self.seconds}) + "\n")


def _load_seconds(path: Path) -> float:
    try:
        return float(json.loads(path.read_text())["seconds"])
    except FileNotFoundError:
        return 0.0
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s is unreadable (%s); the time spent so far counts from now", path, err)
        return 0.0


class BudgetCallback(Callback):
    """Asks the search to stop once a budget is spent (listed after the ledger's callback)."""

    def __init__(self, budget: Budget, stop: Stop) -> None:
        self.budget: Budget | None = budget
        self.stop = stop

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": None, "stop": None}  # a restore gets a new one

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._check()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._check()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.budget is not None:
            self.budget.save(force=True)

    def _check(self) -> None:
        if self.budget is None or self.stop is None:
            return
        self.budget.save()
        if self.stop.requested:
            return
        spent = self.budget.spent()
        if spent is not None:
            self.stop.spend(spent)


def describe_budget(exp: ExperimentConfig) -> list[str]:
    """What the budgets buy, for ``validate``: about how many full trials."""
    from search.references import reference_trials

    lines = []
    epochs, trials = exp.trial.epochs, exp.num_trials + len(reference_trials(exp))
    if exp.stop.epochs is not None:
        n = exp.stop.epochs
        text = (
            f"stop.epochs={n} buys about {n / epochs:.1f} full trials of {epochs} epochs "
            f"(the {trials} trials of num_trials and references would take {trials * epochs})"
        )
        if exp.scheduler is not None:
            text += f"; {exp.scheduler.name} stops most trials early, so more of them start"
        lines.append(text)
    seconds = exp.stop.seconds
    if seconds is not None:
        lines.append(
            f"stop.time={exp.stop.time} ends the search after {seconds / 3600:.3g} h of "
            "wall-clock time (its launch and resumes together)"
        )
    if lines:
        lines.append(
            "whichever of num_trials and the budgets is spent first ends the search; trials "
            "running then stop at the end of their epoch (resumable if the budget is raised)"
        )
    return lines
