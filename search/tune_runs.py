"""The Tune runs of a search folder: started, or restored with this process's parts, and what
Tune saved about each trial.

A search is one Tune run (``<folder>/tune``) unless ``resume`` raised ``num_trials`` after Tune
had issued all it was asked for: Tune keeps its count with its run, so the extra trials come in
a further run, ``tune-2``, on the same study (and so on). ``records`` reads them all.

``Tuner.restore`` rebuilds the search algorithm, scheduler and callbacks from the ``tuner.pkl``
pickled at launch. Those copies keep no credential (their ``__getstate__`` drops them), miss what
``resume`` applied from an edited experiment, and know nothing of this process's stop handling
and tracking queue, so ``restore`` hands Tune this process's own. Ray 2.60 (pinned in setup.cfg)
keeps them on the tuner's ``TunerInternal``; tests/search/test_faults.py covers the swap.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FIRST = "tune"
_SEGMENT = re.compile(r"tune(?:-(\d+))?")


@dataclass
class Parts:
    """What a Tune run of this process uses (fresh objects: a restore gets them too)."""

    scheduler: Any
    callbacks: list[Any]
    max_failures: int
    searcher: Any = None
    concurrency: int | None = None
    stop: Any = None  # search.interrupt.Stop: what the signals asked for


@dataclass(frozen=True)
class TrialRecord:
    """A trial as Tune last saved it."""

    trial_id: str
    status: str  # PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    metrics: dict[str, Any] = field(default_factory=dict)  # its last result
    path: str = ""
    error: str | None = None  # the error's last line, for an ERROR trial
    tags: dict[str, Any] = field(default_factory=dict)  # its config's tags (reference, ...)
    checkpoint: str = ""  # the checkpoint Tune restores it from (a local path; "" if none)


def segments(folder: Path) -> list[Path]:
    """The search's Tune run folders, oldest first."""
    found = {
        p: int(m.group(1) or 1)
        for p in folder.glob("tune*")
        if p.is_dir() and (m := _SEGMENT.fullmatch(p.name))
    }
    return sorted(found, key=found.__getitem__)


def next_segment(folder: Path) -> str:
    runs = segments(folder)
    return FIRST if not runs else f"{FIRST}-{len(runs) + 1}"


def can_restore(path: Path) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(str(path.resolve()))


def records(path: Path) -> list[TrialRecord]:
    """The trials of one Tune run as it last saved them (none if it saved nothing).

    Raises:
        Exception: whatever Tune raises on a damaged state file (search.integrity names it).
    """
    from ray.tune import ExperimentAnalysis

    if not can_restore(path):
        return []
    out = []
    for trial in ExperimentAnalysis(str(path.resolve())).trials:
        error = None
        if trial.status == "ERROR":
            error = _last_line(trial.error_file) or "the trial raised (no error text saved)"
        out.append(
            TrialRecord(
                trial.trial_id,
                trial.status,
                dict(trial.last_result or {}),
                trial.path or "",
                error,
                dict((trial.config or {}).get("tags", {})),
                trial.checkpoint.path if trial.checkpoint is not None else "",
            )
        )
    return out


def all_records(folder: Path) -> list[TrialRecord]:
    return [r for path in segments(folder) for r in records(path)]


def _last_line(path: str | None) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines() if path else []
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def restore(path: Path, trainable: Any, parts: Parts) -> Any:
    """``Tuner.restore`` of an unfinished run (its unfinished and failed trials continue from
    their last checkpoints), running with ``parts`` (see the module docstring)."""
    from ray import tune

    tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    internal = tuner._local_tuner  # noqa: SLF001
    if internal is None:  # Ray Client: refused before (cluster.check_cluster_reachable)
        raise RuntimeError("a Tune run cannot be restored through Ray Client (ray://)")
    internal._tune_config.search_alg = parts.searcher  # noqa: SLF001
    internal._tune_config.scheduler = parts.scheduler  # noqa: SLF001
    internal._run_config.callbacks = parts.callbacks  # noqa: SLF001
    internal._run_config.failure_config = tune.FailureConfig(max_failures=parts.max_failures)  # noqa: SLF001
    return tuner
