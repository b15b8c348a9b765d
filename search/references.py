"""Reference trials: the dense network and the static group convolutions of the searched model's
family, trained by the experiment's recipe so that the front shows what the searched networks
must beat. They bypass the sampler and the budget; the searcher issues them first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dgc
from search.config import ExperimentConfig


@dataclass(frozen=True)
class Reference:
    label: str  # "dense", "group-0.25": MLflow run name suffix, tag and Optuna user attribute
    config: dict[str, Any]  # a TrialConfig as Tune receives it


def reference_trials(exp: ExperimentConfig) -> list[Reference]:
    """The experiment's reference trials, in the order they are issued.

    Raises:
        ValueError: the model is not part of a registered family.
    """
    refs = exp.references
    if refs is None:
        return []
    name = exp.trial.model.name
    out = []
    if refs.dense:
        out.append(Reference("dense", _with_model(exp, dgc.variant_of(name, "dense"), None)))
    for g in refs.static_group:
        config = _with_model(exp, dgc.variant_of(name, "group"), g)
        out.append(Reference(f"group-{g:g}", config))
    return out


def _with_model(exp: ExperimentConfig, name: str, gate_factor: float | None) -> dict[str, Any]:
    config = exp.trial.model_dump(mode="json")
    config["model"] = exp.trial.model.variant(name, gate_factor).model_dump(mode="json")
    config["init_from"] = None  # the baselines train from scratch, by the trial recipe
    d = exp.trial.distill
    if d.weight > 0 and d.teacher is None and exp.trial.init_from:
        config["distill"]["teacher"] = exp.trial.init_from  # the search's teacher teaches them
    return config
