from __future__ import annotations

from search.config import load_experiment
from search.preflight import scheduler_notes
from tests.helpers import REPO

MO_ASHA = REPO / "experiments" / "digits_mo_asha.yaml"  # rungs at epochs 2 and 6 of 12


def test_scheduler_notes_place_the_gate_ramp_against_the_rungs():
    (ok,) = scheduler_notes(load_experiment(MO_ASHA))  # the ramp ends at epoch 2 (unit: epochs)
    assert "the gate ramp ends at epoch 2, by the first rung" in ok
    late = load_experiment(MO_ASHA, ["trial.gate_schedule={warmup_end: 0.1, ramp_end: 0.75}"])
    (warning,) = scheduler_notes(late)
    assert "but the gate ramp ends at epoch 9" in warning and "ramp_end: 2, unit: epochs" in warning
