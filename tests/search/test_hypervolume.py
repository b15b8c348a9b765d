"""The front's hypervolume: literal values for hand-made fronts, and the reference point a
search derives."""

from __future__ import annotations

import math

import pytest

from search.hypervolume import derived_reference
from search.hypervolume import hypervolume

ACC_MACS = [("val_accuracy", "max"), ("macs", "min")]


def test_a_hand_made_front_has_its_literal_hypervolume():
    # Reference (accuracy 0, 10 MACs); the box to the ideal point (1, 0) has area 10.
    # Dominated area: 8 * 0.3 + 6 * 0.2 + 2 * 0.3 = 4.2, so a share of 0.42.
    front = [(0.3, 2.0), (0.5, 4.0), (0.8, 8.0)]
    assert hypervolume(front, ACC_MACS, [0.0, 10.0]) == pytest.approx(0.42)
    # A dominated point adds nothing; one at or beyond the reference adds nothing.
    more = [*front, (0.2, 5.0), (0.9, 10.0), (0.95, 12.0), (math.nan, 1.0)]
    assert hypervolume(more, ACC_MACS, [0.0, 10.0]) == pytest.approx(0.42)
    assert hypervolume([], ACC_MACS, [0.0, 10.0]) == 0.0
    # A tighter reference (accuracy 0.4, 6 MACs): only (0.5, 4) counts, 2 * 0.1 of 6 * 0.6.
    assert hypervolume(front, ACC_MACS, [0.4, 6.0]) == pytest.approx(0.2 / 3.6)


def test_three_objectives():
    objectives = [("val_accuracy", "max"), ("macs", "min"), ("latency_ms", "min")]
    # One point: a box of 0.5 * 2 * 1 = 1 in a reference box of 1 * 4 * 2 = 8.
    assert hypervolume([(0.5, 2.0, 1.0)], objectives, [0.0, 4.0, 2.0]) == pytest.approx(1 / 8)
    # Boxes of 1 and 1 * 1 * 0.5, overlapping in 0.5 * 1 * 0.5: the union is 1.25 of 8.
    two = [(0.5, 2.0, 1.0), (1.0, 3.0, 1.5)]
    assert hypervolume(two, objectives, [0.0, 4.0, 2.0]) == pytest.approx(1.25 / 8)


def test_the_reference_point_comes_from_the_bounds_unless_given():
    assert derived_reference(ACC_MACS, {}, None, [5, 9, 7]) == ([0.0, 9.0], [])
    assert derived_reference(ACC_MACS, {}, 6.0, [5, 9, 7]) == ([0.0, 6.0], [])
    assert derived_reference(ACC_MACS, {"val_accuracy": 0.5}, 6.0, []) == ([0.5, 6.0], [])
    latency = [("val_accuracy", "max"), ("latency_ms", "min")]
    assert derived_reference(latency, {}, None, [5]) == (None, ["latency_ms"])
    assert derived_reference(latency, {"latency_ms": 3.0}, None, [5]) == ([0.0, 3.0], [])
