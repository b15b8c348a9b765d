"""Spaces sampled on Optuna trials (define-by-run), and sampled values back to TrialConfig
overrides."""

from __future__ import annotations

import copy
from typing import Any

from spaces.schema import CategoricalParam
from spaces.schema import FloatParam
from spaces.schema import IntParam
from spaces.schema import SearchSpace
from spaces.schema import is_active


def param_names(key: str, per_stage: bool, num_stages: int) -> list[str]:
    return [f"{key}[{i}]" for i in range(num_stages)] if per_stage else [key]


def suggest(trial: Any, space: SearchSpace, num_stages: int) -> dict[str, Any]:
    """Sample one point define-by-run on an Optuna ``trial``: parameters in space order, a
    conditional one only when its condition holds (so Optuna sees it as conditional).
    Returns the Optuna-named values (``trial.params``)."""
    values: dict[str, Any] = {}
    for key, p in space.params.items():
        if not is_active(p, values):
            continue
        for name in param_names(key, p.per_stage, num_stages):
            values[name] = _suggest_one(trial, name, p)
    return values


def _suggest_one(trial: Any, name: str, p: FloatParam | IntParam | CategoricalParam) -> Any:
    if isinstance(p, FloatParam):
        return trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
    if isinstance(p, IntParam):
        return trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
    return trial.suggest_categorical(name, p.choices)


def corner_values(p: FloatParam | IntParam | CategoricalParam) -> list[Any]:
    """The values preflight builds a model with: every choice, or both bounds."""
    return list(p.choices) if isinstance(p, CategoricalParam) else [p.low, p.high]


def assemble(space: SearchSpace, values: dict[str, Any], num_stages: int) -> dict[str, Any]:
    """{dotted key: value or per-stage list} from Optuna-named values; inactive conditional
    parameters (absent from ``values``) are left out."""
    out: dict[str, Any] = {}
    for key, p in space.params.items():
        names = param_names(key, p.per_stage, num_stages)
        if names[0] not in values:
            continue
        out[key] = [values[n] for n in names] if p.per_stage else values[names[0]]
    return out


def set_dotted(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set ``doc["a"]["b"] = value`` for ``key = "a.b"``, creating missing sections.

    Raises:
        ValueError: a parent on the path holds a value, not a section.
    """
    node = doc
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}: {part!r} is a value, not a section")
    node[leaf] = value


def apply_to_trial(trial: dict[str, Any], assignments: dict[str, Any]) -> dict[str, Any]:
    """A copy of the trial dict with dotted ``assignments`` set."""
    out = copy.deepcopy(trial)
    for key, value in assignments.items():
        set_dotted(out, key, value)
    return out
