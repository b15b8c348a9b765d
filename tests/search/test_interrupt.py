"""Ctrl-C and SIGTERM, driven by hand: the stop levels and the drain's scheduling decisions."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from search.interrupt import DrainScheduler
from search.interrupt import Interrupted
from search.interrupt import Stop

TRIAL = SimpleNamespace(trial_id="t", config={"epochs": 3})


def test_a_drain_pauses_each_trial_at_its_next_checkpoint_and_starts_none():
    stop = Stop()
    drain = DrainScheduler(None, stop)  # Tune's FIFO inside
    checkpoint = {"epoch": 1, "should_checkpoint": True}
    assert drain.on_trial_result(None, TRIAL, checkpoint) == TrialScheduler.CONTINUE
    stop.signum = signal.SIGINT
    assert drain.on_trial_result(None, TRIAL, {"epoch": 1}) == TrialScheduler.CONTINUE
    assert drain.on_trial_result(None, TRIAL, checkpoint) == TrialScheduler.PAUSE
    last = {"epoch": 3, "should_checkpoint": True}  # a last result finishes the trial
    assert drain.on_trial_result(None, TRIAL, last) == TrialScheduler.CONTINUE
    assert drain.choose_trial_to_run(None) is None


def test_the_first_ctrl_c_drains_the_second_stops_now_the_third_at_once():
    ended: list[int] = []
    stop = Stop()
    stop.attach(lambda: ended.append(1))
    stop(signal.SIGINT, None)
    assert stop.requested and not ended  # running trials go on to their checkpoints
    stop(signal.SIGINT, None)
    assert ended == [1] and stop.exit_code == 130  # Tune ends its run now, state saved
    with pytest.raises(Interrupted):
        stop(signal.SIGINT, None)


def test_sigterm_stops_now_and_outside_a_tune_run_a_signal_stops_at_once():
    ended: list[int] = []
    stop = Stop()
    stop.attach(lambda: ended.append(1))
    stop(signal.SIGTERM, None)
    assert ended == [1] and stop.exit_code == 143 and stop.signal_name == "SIGTERM"
    with pytest.raises(Interrupted) as err:
        Stop()(signal.SIGTERM, None)  # no Tune run: nothing to drain
    assert err.value.signum == signal.SIGTERM
