"""MO-ASHA: asynchronous successive halving over several objectives, as a Ray Tune scheduler.

Schmucker et al., "Multi-objective Asynchronous Successive Halving" (2021). Rungs sit at epochs
``grace_period * reduction_factor**k`` below the trial's last epoch. When a trial reaches a rung,
its objective vector there is recorded; it goes on only if fewer than
``ceil(n / reduction_factor)`` of the ``n`` trials recorded at that rung so far (itself
included) are strictly ahead of it by non-dominated rank, then crowding distance
(``search.pareto.sort_keys``); ties go its way. As in Ray's ASHA (the "stopping" variant),
early arrivals at a rung are compared with fewer trials and are stopped less often; a trial is
never resumed once stopped.

Tie-break: NSGA-II's crowding distance rather than Syne Tune's epsilon-net. With two objectives
both keep the ends of the front (the cheapest and the most accurate trial at the rung) and
spread the rest; crowding needs no normalisation constant and no arbitrary first pick, so the
decision is a pure function of the recorded values, which makes the rule testable with literal
cases. A value that is not finite ranks after every finite one.

Ray Tune does not save a scheduler with the experiment, so the rung records and decisions are
written to ``mo_asha.json`` next to the trial folders after every decision: a search resumed
after its driver was killed compares against everything recorded before, and a trial whose stop
was decided but not yet carried out is stopped again at its next result.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler
from ray.tune.schedulers import TrialScheduler

from search.pareto import sort_keys
from trainables import metrics as M

log = logging.getLogger(__name__)

STATE_FILE = "mo_asha.json"


def stopped_at(result: dict, epochs: int) -> int | None:
    """The epoch at which a trial that ended before its last epoch, without reporting a failure,
    was stopped by the scheduler; None for a trial that ran to the end (or failed)."""
    epoch = result.get(M.EPOCH)
    if M.TRIAL_ERROR in result or not isinstance(epoch, (int, float)) or epoch >= epochs:
        return None
    return int(epoch)


def rung_epochs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """Epochs at which trials are compared: grace * rf**k, rounded, below ``max_t``."""
    rungs: list[int] = []
    k = 0
    while (epoch := round(grace_period * reduction_factor**k)) < max_t:
        if not rungs or epoch > rungs[-1]:
            rungs.append(epoch)
        k += 1
    return rungs


def promoted(
    recorded: list[tuple[str, tuple[float, ...]]],
    trial_id: str,
    directions: list[str],
    reduction_factor: float,
) -> bool:
    """Whether ``trial_id`` (already in ``recorded``) continues past the rung: fewer than
    ``ceil(n / reduction_factor)`` of the ``n`` recorded trials are strictly ahead of it (a
    better non-dominated rank, or the same rank and a larger crowding distance). A tie does
    not count against it, as in ASHA a value equal to the cutoff goes on; otherwise the trials
    already promoted would win every tie with a newcomer, however good."""
    values = [v for _, v in recorded]
    mine = next(i for i, (t, _) in enumerate(recorded) if t == trial_id)
    rank, crowd = sort_keys(values, directions)
    keep = max(1, math.ceil(len(recorded) / reduction_factor))
    ahead = sum(
        rank[j] < rank[mine] or (rank[j] == rank[mine] and crowd[j] > crowd[mine])
        for j in range(len(values))
    )
    return ahead < keep


class MoAshaScheduler(FIFOScheduler):
    """Stops trials that are dominated at a rung (see the module docstring).

    Args:
        objectives: (metric, "max" | "min") pairs, as reported by the trainable every epoch.
        max_t: the trials' last epoch (``trial.epochs``); there is no rung at or after it.
        grace_period: the first rung, in epochs.
        reduction_factor: about 1 in ``reduction_factor`` trials goes on at each rung.
    """

    def __init__(
        self,
        objectives: list[tuple[str, str]],
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
    ) -> None:
        super().__init__()
        self.objectives, self.reduction_factor = objectives, reduction_factor
        self.rungs = rung_epochs(grace_period, reduction_factor, max_t)
        self._reset()

    def _reset(self) -> None:
        self.recorded: dict[int, list[tuple[str, tuple[float, ...]]]] = {r: [] for r in self.rungs}
        self.stopped: dict[str, int] = {}  # trial id -> rung epoch it was stopped at
        self._file: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the scheduler once, at the start; the records live in STATE_FILE.
        state = self.__dict__.copy()
        state.update(recorded={r: [] for r in self.rungs}, stopped={}, _file=None)
        return state

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._attach(trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._attach(trial)
        if trial.trial_id in self.stopped:  # decided before a restart, not yet carried out
            return TrialScheduler.STOP
        epoch, values = result.get(M.EPOCH), [result.get(m) for m, _ in self.objectives]
        numbers = tuple(float(v) for v in values if isinstance(v, (int, float)))
        if epoch is None or len(numbers) < len(values):
            return TrialScheduler.CONTINUE  # e.g. a trial reporting its own failure
        action = self._decide(trial.trial_id, int(epoch), numbers)
        if action == TrialScheduler.STOP:
            log.info(
                "MO-ASHA: trial %s stopped at epoch %d (rung %d of %d)",
                trial.trial_id,
                self.stopped[trial.trial_id],
                self.rungs.index(self.stopped[trial.trial_id]) + 1,
                len(self.rungs),
            )
        return action

    def _decide(self, trial_id: str, epoch: int, values: tuple[float, ...]) -> str:
        changed, action = False, TrialScheduler.CONTINUE
        directions = [d for _, d in self.objectives]
        for rung in self.rungs:
            if epoch < rung:
                break
            records = self.recorded[rung]
            if any(t == trial_id for t, _ in records):
                continue
            records.append((trial_id, values))
            changed = True
            if not promoted(records, trial_id, directions, self.reduction_factor):
                self.stopped[trial_id] = rung
                action = TrialScheduler.STOP
                break
        if changed:
            self._save()
        return action

    def _attach(self, trial: Any) -> None:
        """Find the state file next to the trial folders (where Tune keeps them, also after
        the search folder was moved) and load what an earlier driver recorded."""
        storage = getattr(trial, "storage", None)
        if self._file is not None or storage is None:
            return
        self._file = Path(storage.experiment_fs_path) / STATE_FILE  # storage_path is local
        if self._file.is_file():
            saved = json.loads(self._file.read_text(encoding="utf-8"))
            for rung, records in saved["recorded"].items():
                if int(rung) in self.recorded:
                    self.recorded[int(rung)] = [(t, tuple(v)) for t, v in records]
            self.stopped = {t: int(r) for t, r in saved["stopped"].items()}
            log.info("MO-ASHA: %d trial(s) stopped before the restart", len(self.stopped))

    def _save(self) -> None:
        if self._file is None:
            return
        doc = {
            "rungs": self.rungs,
            "objectives": self.objectives,
            "recorded": {
                str(r): [[t, list(v)] for t, v in rec] for r, rec in self.recorded.items()
            },
            "stopped": self.stopped,
        }
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, allow_nan=True))
        os.replace(tmp, self._file)

    def debug_string(self) -> str:
        sizes = ", ".join(f"epoch {r}: {len(self.recorded[r])}" for r in self.rungs)
        return f"MO-ASHA: {len(self.stopped)} stopped; recorded per rung: {sizes}"
