"""Ctrl-C and SIGTERM during a search: stop cleanly, keep everything, say how to continue.

``Stop`` is installed as the handler of SIGINT and SIGTERM while ``launch`` or ``resume`` runs.

- The first Ctrl-C asks each running trial to stop at its next checkpoint: ``DrainScheduler``
  pauses a trial on the first result that carries one (Tune keeps it PAUSED: ``resume``
  continues it from there), starts no new trial, and the searcher suggests nothing more. Once
  no trial runs, ``DrainCallback`` ends Tune's run, which saves its state.
- A second Ctrl-C, or SIGTERM (what schedulers and ``kill`` send before SIGKILL), stops the
  running trials at once: Tune saves its state and ends them; ``resume`` restarts them from
  their last checkpoint.
- Outside a Tune run, and at a third signal, ``Interrupted`` is raised where the program is.

Tune installs its own SIGINT handler at the start of every run; ``DrainCallback.setup`` takes
SIGINT back and keeps Tune's handler (Tune registers it for SIGUSR1 too) as the way to end the
run with its state saved.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING
from typing import Any

from ray.tune import Callback
from ray.tune.result import SHOULD_CHECKPOINT
from ray.tune.schedulers import FIFOScheduler
from ray.tune.schedulers import TrialScheduler

from trainables import metrics as M

if TYPE_CHECKING:
    from search.budget import Budget

log = logging.getLogger(__name__)

#: exit status of a command stopped by a signal, as shells report it (128 + signal number)
EXIT_CODES: dict[int, int] = {int(signal.SIGINT): 130, int(signal.SIGTERM): 143}


class Interrupted(KeyboardInterrupt):
    """The search was stopped by ``signum`` (SIGINT or SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """What the signals asked for: nothing, a drain (one Ctrl-C) or a stop now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self.fault: str | None = None  # a search-level fault that stopped the run (disk full)
        self.budget: str | None = None  # a budget that was spent (search.budget): a drain
        self._end_tune: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """A signal arrived, a fault asked the run to end or a budget is spent: start nothing
        new."""
        return self.interrupted or self.budget is not None

    @property
    def interrupted(self) -> bool:
        """A signal or a fault stopped the search (a spent budget ends it instead)."""
        return self.signum is not None or self.fault is not None

    @property
    def draining(self) -> bool:
        """Running trials stop at their next checkpoint."""
        return self.requested

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum or signal.SIGINT, 130)

    @property
    def signal_name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"

    def install(self) -> None:
        """Handle SIGINT and SIGTERM (again: ``ray.init`` sets its own SIGTERM handler)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; nothing to catch here
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self)
            if previous is not self:
                self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def attach(self, end_tune: Callable[[], None] | None) -> None:
        """While a Tune run is on: how to end it with its state saved (None when it ends)."""
        self._end_tune = end_tune
        if self.requested and end_tune is not None:
            log.info("a stop was requested before this Tune run began; it ends at once")

    def end_tune(self) -> None:
        if self._end_tune is not None:
            end, self._end_tune = self._end_tune, None
            end()

    def spend(self, reason: str) -> None:
        """A budget is spent: drain (as a first Ctrl-C does), then the search ends."""
        if self.budget is None:
            self.budget = reason
            log.warning(
                "budget spent: %s; no trial starts, running trials stop at the end of their "
                "epoch (resumable if the budget is raised), then the front is ranked",
                reason,
            )

    def fail(self, reason: str) -> None:
        """A fault every trial would meet (a full disk): stop the run now."""
        if self.fault is None:
            self.fault = reason
            self.end_tune()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signum = self.signum or signum
        if self._end_tune is None or self.count > 2:
            raise Interrupted(self.signum)
        if signum == signal.SIGINT and self.count == 1:
            log.warning(
                "Ctrl-C: each running trial stops at its next checkpoint, then the search "
                "saves its state and exits. Ctrl-C again stops them now (they continue from "
                "their last checkpoint on resume)."
            )
            return
        log.warning("%s: stopping the running trials now", signal.Signals(signum).name)
        self.end_tune()


class DrainScheduler(TrialScheduler):
    """Wraps the experiment's scheduler (FIFO by default). Once a stop is requested it starts
    no trial and pauses each running one on its first result that carries a checkpoint
    before its last epoch (a last result finishes the trial instead)."""

    def __init__(
        self, inner: TrialScheduler | None, stop: Stop, budget: Budget | None = None
    ) -> None:
        """``budget``: the search's budgets, checked on every result before the decision, so
        the result that spends one pauses its own trial (callbacks see results only after)."""
        super().__init__()
        self.inner = inner if inner is not None else FIFOScheduler()
        self.stop, self.budget = stop, budget

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles it; a restore gets a new one
        return {"inner": self.inner, "stop": None, "budget": None}

    @property
    def metric(self) -> Any:
        return self.inner.metric

    @property
    def supports_buffered_results(self) -> bool:
        return self.inner.supports_buffered_results

    def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        if self.budget is not None and self.stop is not None and not self.stop.requested:
            self.budget.ledger.trained(trial.trial_id, result)
            spent = self.budget.spent()
            if spent is not None:
                self.stop.spend(spent)
        if decision != TrialScheduler.CONTINUE or self.stop is None or not self.stop.draining:
            return decision
        last = result.get(M.EPOCH, 0) >= trial.config.get("epochs", float("inf"))
        if result.get(SHOULD_CHECKPOINT) and not last:
            log.info("trial %s stops at its checkpoint of epoch %s", trial.trial_id,
                     result.get(M.EPOCH))  # fmt: skip
            return TrialScheduler.PAUSE
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        if self.stop is not None and self.stop.requested:
            return None
        return self.inner.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return self.inner.debug_string()

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


class DrainCallback(Callback):
    """Connects ``Stop`` to a Tune run: takes SIGINT back from Tune at the start, ends the run
    (Tune saves its state) once a drain has no running trial left."""

    def __init__(self, stop: Stop) -> None:
        self.stop: Stop | None = stop

    def __getstate__(self) -> dict[str, Any]:
        return {"stop": None}

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        if self.stop is None:
            return
        tune_handler = signal.getsignal(signal.SIGUSR1)  # Tune's "end the run" (see above)
        self.stop.install()
        if callable(tune_handler):
            self.stop.attach(lambda: tune_handler(signal.SIGUSR1, None))
        if self.stop.requested:
            self.stop.end_tune()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.stop is None or not self.stop.draining:
            return
        if not any(t.status == "RUNNING" for t in trials):
            self.stop.end_tune()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.stop is not None:
            self.stop.attach(None)
