"""A search folder: its saved state (``search.json``) and its resolved experiment, which
``resume``, ``pareto`` and ``export`` read back."""

from __future__ import annotations

import json
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path

from search.config import ExperimentConfig
from search.overrides import SearchConfigError
from search.overrides import safe_yaml
from search.preflight import Problem
from search.tracking import Tracking
from search.tracking import default_tracking_uri

STATE_FILE = "search.json"
RESOLVED_FILE = "experiment.resolved.yaml"


@dataclass
class SearchState:
    """What ``resume`` and ``pareto`` need to find a search again (``<dir>/search.json``)."""

    tracking_uri: str
    mlflow_experiment: str
    parent_run_id: str
    optuna_storage: str
    study_name: str
    num_classes: int
    input_size: list[int]
    num_stages: int

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> SearchState:
        path = folder / STATE_FILE
        if not path.is_file():
            raise SearchConfigError(
                f"{folder}: not a search folder (no {STATE_FILE}); give the "
                "folder that `launch` printed"
            )
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as err:  # JSON errors, missing or unknown fields
            raise SearchConfigError(
                f"{path}: damaged search state ({str(err)[:200]}); it is written by launch and "
                "not meant to be edited (restore it from a backup, or launch a new search)"
            ) from err


def open_search(folder: Path) -> tuple[ExperimentConfig, SearchState, Tracking]:
    """The resolved experiment, the saved state and the MLflow connection of a search folder."""
    state = SearchState.load(folder)
    path = folder / RESOLVED_FILE
    try:
        exp = ExperimentConfig.model_validate(
            safe_yaml(path.read_text(encoding="utf-8"), str(path))
        )
    except (OSError, ValueError) as err:  # missing, not UTF-8, not YAML, or invalid
        raise SearchConfigError(
            f"{path}: damaged resolved experiment ({str(err)[:300]}); launch writes it and "
            "resume, pareto and export read it"
        ) from err
    return exp, state, Tracking(state.tracking_uri, state.mlflow_experiment, state.parent_run_id)


def new_state(exp: ExperimentConfig, problem: Problem, folder: Path) -> SearchState:
    uri = exp.mlflow.tracking_uri or default_tracking_uri()
    storage = exp.optuna_storage or f"sqlite:///{folder / 'optuna.db'}"
    return SearchState(
        uri,
        exp.mlflow.experiment or exp.name,
        "",
        storage,
        exp.name,
        problem.num_classes,
        list(problem.input_size),
        problem.num_stages,
    )
