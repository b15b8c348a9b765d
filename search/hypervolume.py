"""The hypervolume of a search's front, watched while it runs.

A search has one reference point, fixed at launch (``SearchState.reference_point``): the
experiment's ``hypervolume.reference`` where it gives one, else the objective's bound
(accuracy 0; MACs the budget, or the most MACs validation saw in the space). The hypervolume
is the share of the box between the ideal point (accuracy 1, every cost 0) and the reference
point that the searched trials' front dominates: 0 for nothing, 1 for a perfect network.
Reference trials (the dense and static group networks) are yardsticks, not search results, and
trials stopped early by the scheduler never reach the front: neither counts.

The computation is moocore's (``moocore.hypervolume``), a maintained C implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from trainables import metrics as M

if TYPE_CHECKING:
    from search.config import ExperimentConfig
    from search.preflight import Report

#: the best value each objective can take (the ideal point's coordinate)
IDEAL = {M.VAL_ACCURACY: 1.0, M.VAL_LOSS: 0.0, M.MACS: 0.0, M.PARAMS: 0.0, M.LATENCY_MS: 0.0}
#: metrics of the parent run: the front's hypervolume at step = trials ended, the epochs spent
#: at step = trials ended, and the hypervolume at step = epochs spent (compute)
HYPERVOLUME = "hypervolume"
EPOCHS_SPENT = "epochs_spent"
HYPERVOLUME_BY_EPOCHS = "hypervolume_by_epochs"
#: metric of the parent run when the search ends: the epochs it trained in all, the trials'
#: (references included) and the search's pretraining of the dense network
COMPUTE_EPOCHS = "compute_epochs"


def reference_point(exp: ExperimentConfig, report: Report) -> list[float] | None:
    """The search's reference point (None: an objective has no bound and none is given)."""
    objectives = [(o.metric, o.direction) for o in exp.objectives]
    point, _ = derived_reference(objectives, exp.hypervolume.reference, exp.budget.macs,
                                 report.macs)  # fmt: skip
    return point


def describe_reference(exp: ExperimentConfig, report: Report) -> str:
    """One line for ``validate`` and the launch log: the reference point, or how to set it."""
    objectives = [(o.metric, o.direction) for o in exp.objectives]
    point, missing = derived_reference(objectives, exp.hypervolume.reference, exp.budget.macs,
                                       report.macs)  # fmt: skip
    if point is None:
        return (
            f"no hypervolume is logged: {', '.join(missing)} has no bound; set "
            f"hypervolume.reference.{missing[0]} in the experiment file to the worst value "
            "that should still count"
        )
    shown = ", ".join(_shown(m, v) for (m, _), v in zip(objectives, point))
    return f"hypervolume reference point (the worst point that counts): {shown}"


def _shown(metric: str, value: float) -> str:
    if metric in (M.MACS, M.PARAMS):
        return f"{metric} {value / 1e6:.4g} M"
    return f"{metric} {value:.4g}"


def derived_reference(
    objectives: Sequence[tuple[str, str]],
    given: dict[str, float],
    budget_macs: float | None,
    macs_seen: Sequence[int],
) -> tuple[list[float] | None, list[str]]:
    """The reference point (one value per objective, in their order), or None and the metrics
    whose bound is unknown (they must be given in ``hypervolume.reference``)."""
    point: list[float] = []
    missing: list[str] = []
    for metric, _ in objectives:
        if metric in given:
            point.append(float(given[metric]))
        elif metric == M.VAL_ACCURACY:
            point.append(0.0)
        elif metric == M.MACS and (budget_macs or macs_seen):
            point.append(float(budget_macs or max(macs_seen)))
        else:
            missing.append(metric)
    return (None, missing) if missing else (point, [])


def hypervolume(
    values: Sequence[Sequence[float]],
    objectives: Sequence[tuple[str, str]],
    reference: Sequence[float],
) -> float:
    """The share of the box between the ideal point and ``reference`` that ``values`` dominate
    (``objectives``: (metric, "max"/"min") of each coordinate). A point that is not strictly
    better than the reference on every objective, or not finite, adds nothing."""
    import moocore
    import numpy as np

    maximise = [d == "max" for _, d in objectives]
    kept = [
        v
        for v in values
        if all(math.isfinite(x) for x in v)
        and all((x > r) if up else (x < r) for x, r, up in zip(v, reference, maximise))
    ]
    box = math.prod(abs(IDEAL.get(m, 0.0) - r) for (m, _), r in zip(objectives, reference))
    if not kept or box == 0:
        return 0.0
    volume = moocore.hypervolume(
        np.asarray(kept, dtype=float), ref=np.asarray(reference, dtype=float), maximise=maximise
    )
    return float(volume) / box
