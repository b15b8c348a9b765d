from __future__ import annotations

import itertools
import random

from search.pareto import dominates
from search.pareto import pareto_ranks


def test_dominance_in_mixed_directions():
    assert dominates((0.9, 10), (0.8, 20), (1, -1))
    assert not dominates((0.9, 30), (0.8, 20), (1, -1))
    assert not dominates((0.9, 10), (0.9, 10), (1, -1))  # ties do not dominate


def test_ranks_on_hand_made_points():
    pts = [(0.9, 100), (0.8, 50), (0.85, 120), (0.7, 50), (0.9, 100)]
    assert pareto_ranks(pts, ["max", "min"]) == [1, 1, 2, 2, 1]


def _beats(q, p):
    """Independent of search.pareto: q has at least p's accuracy and at most its MACs, and is
    strictly better in one of them."""
    return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])


def test_front_matches_brute_force_on_random_points():
    rng = random.Random(0)
    pts = [(rng.random(), rng.randint(1, 20)) for _ in range(60)]
    ranks = pareto_ranks(pts, ["max", "min"])
    front = {i for i, p in enumerate(pts) if not any(_beats(q, p) for q in pts)}
    assert {i for i, r in enumerate(ranks) if r == 1} == front
    for i, j in itertools.permutations(range(len(pts)), 2):
        if _beats(pts[i], pts[j]):
            assert ranks[i] < ranks[j]


def test_front_of_a_hand_made_set_is_the_literal_one():
    #        0           1          2           3          4          5
    pts = [(0.95, 80), (0.90, 40), (0.97, 200), (0.90, 60), (0.80, 40), (0.97, 150)]
    ranks = pareto_ranks(pts, ["max", "min"])
    assert [i for i, r in enumerate(ranks) if r == 1] == [0, 1, 5]
    assert ranks[2] == 2 and ranks[3] == 2 and ranks[4] == 2


def test_single_objective_front_is_the_best():
    assert pareto_ranks([(1.0,), (3.0,), (2.0,)], ["min"]) == [1, 3, 2]
