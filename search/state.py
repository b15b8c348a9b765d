"""A search folder: its saved state (``search.json``) and its resolved experiment, which
``resume``, ``pareto`` and ``export`` read back.

Both files are written with every credential of a URL replaced by ``***`` (search.redact);
``load_search`` fills them in again from the environment or the experiment file the search was
launched from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError

from search.config import ExperimentConfig
from search.overrides import SearchConfigError
from search.preflight import Problem
from search.redact import STORAGE_ENV
from search.redact import TRACKING_ENV
from search.redact import redact
from search.redact import with_credential
from search.tracking import Tracking
from search.tracking import default_tracking_uri
from spaces.errors import format_validation_error
from spaces.yaml_file import read_yaml

STATE_FILE = "search.json"
RESOLVED_FILE = "experiment.resolved.yaml"


class SearchState(BaseModel):
    """What ``resume`` and ``pareto`` need to find a search again (``<dir>/search.json``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tracking_uri: str = Field(min_length=1)
    mlflow_experiment: str = Field(min_length=1)
    parent_run_id: str
    optuna_storage: str = Field(min_length=1)
    study_name: str = Field(min_length=1)
    num_classes: int = Field(ge=1)
    input_size: list[int] = Field(min_length=3, max_length=3)
    num_stages: int = Field(ge=1)
    #: the experiment file of the launch and its --set overrides (credentials redacted):
    #: resume compares the file as it is now with the search as launched
    experiment_file: str | None = None
    overrides: list[str] = Field(default_factory=list)
    #: the hypervolume's reference point, one value per objective, fixed at launch (None: an
    #: objective has no bound and the experiment gives none; no hypervolume is logged)
    reference_point: list[float] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``input_size`` as the (C, H, W) the model builders take."""
        c, h, w = self.input_size
        return c, h, w

    def save(self, folder: Path) -> None:
        write_atomic(folder / STATE_FILE, redact(json.dumps(self.model_dump(), indent=2)))

    @classmethod
    def load(cls, folder: Path) -> SearchState:
        path = folder / STATE_FILE
        if not path.is_file():
            raise SearchConfigError(
                f"{folder}: not a search folder (no {STATE_FILE}); give the "
                "folder that `launch` printed"
            )
        fix = (
            "it is written by launch and not meant to be edited (restore it from a backup, or "
            "launch a new search)"
        )
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
            raise SearchConfigError(
                f"{path}: damaged search state ({str(err)[:200]}); {fix}"
            ) from err
        try:
            return cls.model_validate(doc)
        except ValidationError as err:  # missing, unknown or mistyped fields
            detail = format_validation_error(err, str(path))
            raise SearchConfigError(f"damaged search state: {detail}; {fix}") from err


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling: a stop mid-write (or a full
    disk) leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_resolved(folder: Path, exp: ExperimentConfig) -> None:
    """The experiment as the search runs it (credentials redacted)."""
    text = yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
    write_atomic(folder / RESOLVED_FILE, redact(text))


def read_resolved(folder: Path) -> ExperimentConfig:
    path = folder / RESOLVED_FILE
    try:
        return ExperimentConfig.model_validate(read_yaml(path, "resolved experiment"))
    except (OSError, ValueError) as err:  # missing, not UTF-8, not YAML, or invalid
        raise SearchConfigError(
            f"{path}: damaged resolved experiment ({str(err)[:300]}); launch writes it and "
            "resume, pareto and export read it"
        ) from err


def load_search(folder: Path) -> tuple[ExperimentConfig, SearchState]:
    """The resolved experiment and the saved state of a search folder, with the credentials
    of its URLs filled in (nothing is contacted)."""
    state = SearchState.load(folder)
    exp = read_resolved(folder)
    user = _user_values(state)
    live = {
        "optuna_storage": _credential(
            state.optuna_storage,
            [os.environ.get(STORAGE_ENV), user.get("optuna_storage")],
            folder,
            f"optuna_storage (or the environment variable {STORAGE_ENV})",
        ),
        "tracking_uri": _credential(
            state.tracking_uri,
            [os.environ.get(TRACKING_ENV), (user.get("mlflow") or {}).get("tracking_uri")],
            folder,
            f"mlflow.tracking_uri (or the environment variable {TRACKING_ENV})",
        ),
    }
    return exp, state.model_copy(update=live)


def _user_values(state: SearchState) -> dict[str, Any]:
    """The experiment file the search was launched from, as it is now (empty if gone)."""
    if not state.experiment_file:
        return {}
    try:
        doc = read_yaml(state.experiment_file, "experiment")
    except ValueError:  # gone, unreadable, or not YAML
        return {}
    return doc if isinstance(doc, dict) else {}


def _credential(stored: str, candidates: list[str | None], folder: Path, where: str) -> str:
    url = with_credential(stored, candidates)
    if url is None:
        raise SearchConfigError(
            f"{folder / STATE_FILE}: {stored} lacks its credential, which is never stored; "
            f"give the full URL in {where}, then run the command again"
        )
    return url


def open_search(folder: Path) -> tuple[ExperimentConfig, SearchState, Tracking]:
    """The resolved experiment, the saved state and the MLflow connection of a search folder."""
    exp, state = load_search(folder)
    return exp, state, Tracking(state.tracking_uri, state.mlflow_experiment, state.parent_run_id)


def new_state(
    exp: ExperimentConfig,
    problem: Problem,
    folder: Path,
    source: str | None = None,
    overrides: list[str] | None = None,
) -> SearchState:
    """``source``: the experiment file (absolute) that gives the search with ``overrides``."""
    return SearchState(
        tracking_uri=exp.mlflow.tracking_uri or default_tracking_uri(),
        mlflow_experiment=exp.mlflow.experiment or exp.name,
        parent_run_id="",
        optuna_storage=exp.optuna_storage or f"sqlite:///{folder / 'optuna.db'}",
        study_name=exp.name,
        num_classes=problem.num_classes,
        input_size=list(problem.input_size),
        num_stages=problem.num_stages,
        experiment_file=source,
        overrides=[redact(o) for o in overrides or []],
    )
