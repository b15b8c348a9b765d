"""Non-dominated sorting over trial metrics (our own, small and tested)."""

from __future__ import annotations

import math
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


def crowding_distances(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II crowding distance of each point within one front: per objective, the gap between
    its two neighbours over the front's range, summed; the extremes get infinity."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    dist = [0.0] * n
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][k])
        low, high = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if high == low:
            continue
        for before, i, after in zip(order, order[1:], order[2:]):
            dist[i] += (points[after][k] - points[before][k]) / (high - low)
    return dist


def sort_keys(
    points: Sequence[Sequence[float]], directions: Sequence[str]
) -> tuple[list[float], list[float]]:
    """(rank, crowding distance) of each point, for successive halving over several
    objectives: lower rank first, then larger crowding (the front's extremes and its sparse
    parts first). A point with a non-finite value ranks after every finite one (rank inf)."""
    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    rank = [math.inf] * len(points)
    crowd = [0.0] * len(points)
    ranks = pareto_ranks([points[i] for i in finite], directions)
    for r in set(ranks):
        members = [i for i, k in zip(finite, ranks) if k == r]
        for i, d in zip(members, crowding_distances([points[i] for i in members])):
            rank[i], crowd[i] = r, d
    return rank, crowd
