"""Non-dominated sorting over trial metrics (our own, small and tested)."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[int]) -> bool:
    """True if ``a`` is at least as good as ``b`` everywhere and better somewhere.

    ``signs`` is +1 for a maximised objective, -1 for a minimised one.
    """
    better = False
    for x, y, s in zip(a, b, signs):
        if s * x < s * y:
            return False
        better |= s * x > s * y
    return better


def pareto_ranks(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Rank of each point: 1 for the Pareto front, 2 for the front once rank 1 is removed..."""
    signs = [1 if d == "max" else -1 for d in directions]
    ranks = [0] * len(points)
    remaining = set(range(len(points)))
    rank = 1
    while remaining:
        front = {
            i
            for i in remaining
            if not any(dominates(points[j], points[i], signs) for j in remaining if j != i)
        }
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks
