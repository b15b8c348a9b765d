"""MO-ASHA's promotion rule on hand-made rung results, and its state across a driver restart."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from search.pareto import crowding_distances
from search.pareto import sort_keys
from search.scheduler import MoAshaScheduler
from search.scheduler import promoted
from search.scheduler import rung_epochs
from search.scheduler import stopped_at

MAXMIN = ["max", "min"]  # (val_accuracy, macs)
STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE


def test_rungs_are_grace_times_powers_of_the_factor_below_max_t():
    assert rung_epochs(1, 3, 9) == [1, 3]
    assert rung_epochs(1, 3, 10) == [1, 3, 9]
    assert rung_epochs(2, 2, 12) == [2, 4, 8]
    assert rung_epochs(1, 1.5, 4) == [1, 2, 3]  # 1, 1.5->2, 2.25->2 (dropped), 3.375->3


def test_crowding_distance_of_a_four_point_front():
    # accuracy spans 0.3, MACs span 0.9: the interior points sum their neighbours' gaps
    front = [(0.9, 1.0), (0.8, 0.5), (0.7, 0.2), (0.6, 0.1)]
    d = crowding_distances(front)
    assert d[0] == d[3] == math.inf
    assert d[1] == pytest.approx((0.9 - 0.7) / 0.3 + (1.0 - 0.2) / 0.9)
    assert d[2] == pytest.approx((0.8 - 0.6) / 0.3 + (0.5 - 0.1) / 0.9)


def test_sort_keys_are_rank_then_crowding():
    pts = [(0.9, 1.0), (0.8, 2.0), (0.95, 3.0), (0.85, 1.5), (0.5, 0.1)]
    # front: 0, 2, 4 (0.9@1.0, 0.95@3.0, 0.5@0.1); 3 is dominated by 0 only; 1 by 0 and 3.
    # In the front, 2 and 4 are the extremes (infinite crowding); 0 is interior.
    rank, crowd = sort_keys(pts, MAXMIN)
    assert rank == [1, 3, 1, 2, 1]
    assert crowd[2] == crowd[4] == math.inf
    assert crowd[0] == pytest.approx((0.95 - 0.5) / 0.45 + (3.0 - 0.1) / 2.9)


def test_non_finite_values_rank_after_every_finite_one():
    rank, _ = sort_keys([(math.nan, 1.0), (0.5, 2.0), (0.6, math.inf), (0.1, 9.0)], MAXMIN)
    assert rank == [math.inf, 1, math.inf, 2]


@pytest.mark.parametrize(
    "arrivals,expected",
    [
        # alone at the rung: always goes on (as Ray's ASHA)
        ([("a", (0.5, 100))], True),
        # dominated by the only other one: ceil(2/3) = 1 goes on, and a is ahead of b
        ([("a", (0.5, 100)), ("b", (0.4, 200))], False),
        # dominates the other: goes on
        ([("a", (0.5, 100)), ("b", (0.6, 50))], True),
        # non-dominated pair, both extremes (a tie): the newcomer is not behind, goes on
        ([("a", (0.5, 100)), ("b", (0.6, 300))], True),
        # an exact tie with an earlier trial: goes on (ASHA: equal to the cutoff continues)
        ([("a", (0.5, 100)), ("b", (0.5, 100))], True),
        # front (a, d), then c, then b: 4 recorded, ceil(4/3) = 2; c has a and d ahead: stops
        ([("a", (0.5, 100)), ("d", (0.7, 300)), ("b", (0.4, 200)), ("c", (0.45, 150))], False),
        # the same four with d last: d is on the front, nothing strictly ahead: goes on
        ([("a", (0.5, 100)), ("b", (0.4, 200)), ("c", (0.45, 150)), ("d", (0.7, 300))], True),
        # a three-point front, b interior (finite crowding) behind two extremes, keep 1: stops
        ([("a", (0.5, 100)), ("c", (0.9, 300)), ("b", (0.7, 200))], False),
        # a non-finite accuracy among others: behind them, stopped
        ([("a", (0.1, 900)), ("b", (math.nan, 10))], False),
    ],
)
def test_promotion_decisions(arrivals, expected):
    trial = arrivals[-1][0]
    assert promoted(arrivals, trial, MAXMIN, 3.0) is expected


def test_larger_reduction_factor_keeps_fewer():
    arrivals = [(f"t{i}", (0.5 + 0.01 * i, 100 + i)) for i in range(6)]  # one front, 6 points
    # t0 and t5 are the extremes (nothing ahead); t1..t4 are interior, equally spaced: each
    # has the two extremes ahead. rf 2 keeps ceil(6/2) = 3 (2 ahead < 3: all go on); rf 3
    # keeps 2; rf 6 keeps 1.
    keep = {rf: [t for t, _ in arrivals if promoted(arrivals, t, MAXMIN, rf)] for rf in (2, 3, 6)}
    assert keep == {2: [t for t, _ in arrivals], 3: ["t0", "t5"], 6: ["t0", "t5"]}


def test_stopped_at_tells_stopped_trials_from_finished_and_failed_ones():
    assert stopped_at({"epoch": 3, "val_accuracy": 0.5}, 9) == 3
    assert stopped_at({"epoch": 9, "val_accuracy": 0.5}, 9) is None
    assert stopped_at({"trial_error": "NonFiniteLossError"}, 9) is None
    assert stopped_at({"epoch": 2, "trial_error": "x"}, 9) is None


def _trial(tid: str, folder) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, storage=SimpleNamespace(experiment_fs_path=str(folder)))


def _result(epoch: int, acc: float, macs: float) -> dict:
    return {"epoch": epoch, "val_accuracy": acc, "macs": macs}


def test_scheduler_decides_at_rungs_only_and_survives_a_restart(tmp_path):
    objectives = [("val_accuracy", "max"), ("macs", "min")]
    s = MoAshaScheduler(objectives, max_t=9, grace_period=1, reduction_factor=3)
    a, b, c = (_trial(t, tmp_path) for t in "abc")
    for t in (a, b, c):
        s.on_trial_add(None, t)
    blank = pickle.dumps(s)  # what Tune pickled at the start of the search
    assert s.on_trial_result(None, a, _result(1, 0.5, 100)) == GO
    assert s.on_trial_result(None, b, _result(1, 0.6, 50)) == GO  # dominates a
    assert s.on_trial_result(None, a, _result(2, 0.1, 100)) == GO  # no rung at epoch 2
    assert s.on_trial_result(None, c, _result(1, 0.4, 200)) == STOP  # b and a ahead, keep 1
    assert s.stopped == {"c": 1}
    assert s.on_trial_result(None, c, {"trial_error": "boom"}) == STOP  # stopped stays stopped
    assert s.on_trial_result(None, a, {"trial_error": "boom"}) == GO  # no values: no decision

    # The driver dies; Tune restores the scheduler as pickled at the start.
    r = pickle.loads(blank)
    assert r.stopped == {} and r.recorded == {1: [], 3: []}
    r.on_trial_add(None, _trial("a", tmp_path))
    assert r.stopped == {"c": 1} and [t for t, _ in r.recorded[1]] == ["a", "b", "c"]
    assert r.on_trial_result(None, c, _result(2, 0.9, 1)) == STOP  # decided before the kill
    # a reached rung 3 (epoch 3) first, alone there: goes on; b after it, dominated by a there
    assert r.on_trial_result(None, a, _result(3, 0.7, 100)) == GO
    assert r.on_trial_result(None, b, _result(3, 0.65, 100)) == STOP
    # a trial restored past a rung it never recorded is judged at its first result after it:
    # at epoch 1's rung b, a and c are all ahead of d, ceil(4/3) = 2 go on
    d = _trial("d", tmp_path)
    assert r.on_trial_result(None, d, _result(4, 0.2, 500)) == STOP
    assert r.stopped == {"c": 1, "b": 3, "d": 1}
