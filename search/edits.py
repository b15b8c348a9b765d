"""An experiment file edited after its launch, compared at ``resume`` with the search as
launched (``experiment.resolved.yaml``).

Changes that keep the trials comparable are applied, and said: ``num_trials`` (more trials, or
fewer: none beyond it is started), the compute budgets ``stop.epochs`` and ``stop.time`` (a
raised one continues the trials a spent one paused), ``max_failures``,
``mlflow.register_models`` and the Ray settings (``ray.*``, used to join or start the cluster).
Any other change (the space, the recipe, the objectives, the sampler, the MACs budget, the
resources, ...) would mix two searches in
one study and one front: ``resume`` refuses it and says how to undo it or launch the edited
file as a new search.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from search.config import ExperimentConfig
from search.config import load_experiment
from search.overrides import SearchConfigError
from search.pretrain import with_init
from search.redact import redact
from search.state import SearchState
from trainables import metrics as M

log = logging.getLogger(__name__)

#: dotted keys (or their prefixes) that a resume applies
SAFE = ("num_trials", "stop.", "max_failures", "mlflow.register_models", "ray.")
#: keys that do not describe the search (the folder is given to resume)
IGNORED = ("storage_dir",)


def resolved(exp: ExperimentConfig, folder: Path) -> ExperimentConfig:
    """``exp`` as a search in ``folder`` runs it (and as launch saves it)."""
    if any(o.metric == M.LATENCY_MS for o in exp.objectives):
        trial = exp.trial.model_copy(update={"measure_latency": True})
        exp = exp.model_copy(update={"trial": trial})
    # Absolute storage_dir: resume and pareto may run from another folder.
    return with_init(exp.model_copy(update={"storage_dir": str(folder.parent)}), folder)


def launched_from(
    exp: ExperimentConfig, source: str, overrides: list[str], folder: Path
) -> str | None:
    """``source`` (absolute) if it, with ``overrides``, gives ``exp``: then resume can compare
    it with the search as launched. None when a caller (a test, a script) launched something
    else than the file says."""
    try:
        same = _redacted(resolved(load_experiment(source, overrides), folder)) == _redacted(exp)
    except SearchConfigError:
        same = False
    return str(Path(source).resolve()) if same else None


def apply_edits(exp: ExperimentConfig, state: SearchState, folder: Path) -> ExperimentConfig:
    """The search to resume: ``exp`` (as saved), with the safe edits of the experiment file
    applied (logged); SearchConfigError for any other edit."""
    source = state.experiment_file
    if not source:
        return exp
    if not Path(source).is_file():
        log.info("%s is gone; resuming the search as launched (%s)", source, folder)
        return exp
    try:
        current = resolved(load_experiment(source, state.overrides), folder)
    except SearchConfigError as err:
        raise SearchConfigError(
            f"{err} (resume compares the experiment file, as it is now, with the search as "
            f"launched: fix the file, or undo its edits)"
        ) from err
    before, after = _flat(_redacted(exp)), _flat(_redacted(current))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    changed = [k for k in changed if not k.startswith(IGNORED)]
    refused = [k for k in changed if not k.startswith(SAFE)]
    if refused:
        raise SearchConfigError(
            f"{source} was edited since the launch of {folder}: "
            + "; ".join(_change(k, before, after) for k in refused[:6])
            + (f" (and {len(refused) - 6} more)" if len(refused) > 6 else "")
            + ". Such changes would mix two searches in one study and one front, so resume "
            "refuses them; it applies only num_trials, stop.*, max_failures, "
            "mlflow.register_models and ray.*. Undo these edits to resume, or launch the "
            "edited file as a new search: "
            f"`python -m search launch {source} --set name={exp.name}-2`"
        )
    if not changed:
        return exp
    log.warning(
        "resume applies the edits of %s: %s",
        source,
        "; ".join(_change(k, before, after) for k in changed),
    )
    return ExperimentConfig.model_validate(_merge(exp.model_dump(mode="json"), current, changed))


def _redacted(exp: ExperimentConfig) -> dict[str, Any]:
    """The saved file has its credentials redacted; compare like with like."""
    return json.loads(redact(json.dumps(exp.model_dump(mode="json"))))


def _merge(saved: dict[str, Any], current: ExperimentConfig, keys: list[str]) -> dict[str, Any]:
    now = current.model_dump(mode="json")
    for key in {k.split(".")[0] for k in keys}:
        saved[key] = now.get(key)
    return saved


def _change(key: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    def shown(v: Any) -> str:
        return "(unset)" if v is _MISSING else redact(repr(v))[:80]

    return f"{key}: {shown(before.get(key, _MISSING))} -> {shown(after.get(key, _MISSING))}"


_MISSING = object()


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out
