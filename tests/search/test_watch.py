"""The ledger a search keeps as its trials report: epochs spent, trials ended, and the
searched front's hypervolume (seeded from Tune's records at resume)."""

from __future__ import annotations

import pytest

from search.tune_runs import TrialRecord
from search.watch import Ledger

ACC_MACS = [("val_accuracy", "max"), ("macs", "min")]


def _record(trial_id, status, epoch, acc=None, macs=None, **extra):
    metrics = {"epoch": epoch, "config": {"epochs": 4}}
    if acc is not None:
        metrics.update(val_accuracy=acc, macs=macs)
    tags = extra.pop("tags", {})
    return TrialRecord(trial_id, status, {**metrics, **extra}, "", None, tags)


def test_the_ledger_counts_epochs_and_keeps_only_searched_full_trials():
    records = [
        _record("a", "TERMINATED", 4, 0.3, 2.0),
        _record("b", "TERMINATED", 4, 0.8, 8.0),
        _record("c", "TERMINATED", 2, 0.99, 1.0),  # stopped early at epoch 2 of 4
        _record("d", "TERMINATED", 4, 0.99, 1.0, tags={"reference": "dense"}),
        _record("e", "ERROR", 1),
        _record("f", "PAUSED", 3, 0.5, 4.0),  # in flight: counted in epochs, not ended
        _record("g", "TERMINATED", 1, 0.99, 1.0, trial_error="bad config"),
    ]
    ledger = Ledger(ACC_MACS, [0.0, 10.0], 4).seed(records)
    assert ledger.epochs_spent == 4 + 4 + 2 + 4 + 1 + 3 + 1
    assert ledger.ended == {"a", "b", "c", "d", "e", "g"}
    assert ledger.values == [(0.3, 2.0), (0.8, 8.0)]
    # (8 * 0.3 + 2 * 0.5) / 10
    assert ledger.hypervolume() == pytest.approx(0.34)
    ledger.trained("f", {"epoch": 4})
    ledger.end("f", {"epoch": 4, "val_accuracy": 0.5, "macs": 4.0}, {})
    ledger.end("f", {"epoch": 4, "val_accuracy": 0.5, "macs": 4.0}, {})  # once only
    assert ledger.epochs_spent == 20 and len(ledger.ended) == 7
    assert ledger.hypervolume() == pytest.approx(0.42)
    assert Ledger(ACC_MACS, None, 4).seed(records).hypervolume() is None
