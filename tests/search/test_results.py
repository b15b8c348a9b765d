from __future__ import annotations

from search.results import Point
from search.results import _alias


def _point(run_id: str, macs: float) -> Point:
    return Point(run_id, "trial-1", (0.9, macs), {"macs": macs}, {})


def test_aliases_of_nearly_equal_macs_differ_and_are_stable():
    a = _point("0123456789abcdef0123456789abcdef", 414_123)
    b = _point("fedcba9876543210fedcba9876543210", 414_456)  # same 3 significant digits
    assert _alias(a) == "macs-0p414m-01234567"
    assert _alias(b) == "macs-0p414m-fedcba98"
    assert _alias(a) == _alias(_point(a.run_id, 414_123))  # a run's alias never changes
