"""ExperimentConfig: one YAML file describes a whole search (validated, unknown keys rejected)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from typing import Literal

from pydantic import Field
from pydantic import ValidationError
from pydantic import field_validator
from pydantic import model_validator

from search.overrides import SearchConfigError
from search.overrides import apply_overrides
from search.overrides import load_yaml
from spaces.errors import format_validation_error
from spaces.load import SpaceError
from spaces.load import load_space
from spaces.load import resolve_space_path
from spaces.schema import SearchSpace
from trainables import metrics as M
from trainables.config import MAX_SEED
from trainables.config import StrictModel
from trainables.config import TrialConfig


class Objective(StrictModel):
    metric: str
    mode: Literal["max", "min"] | None = None

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in M.OBJECTIVES:
            raise ValueError(f"unknown objective metric {v!r}; choose from {sorted(M.OBJECTIVES)}")
        return v

    @property
    def direction(self) -> str:
        return self.mode or M.OBJECTIVES[self.metric]


class SamplerConfig(StrictModel):
    name: Literal["tpe", "nsgaii", "random"] = "tpe"
    seed: int | None = Field(0, ge=0, le=MAX_SEED)
    population_size: int | None = Field(None, ge=2)
    n_startup_trials: int | None = Field(None, ge=0)
    #: TPE only (None: Optuna's default): ``multivariate`` models the parameters jointly;
    #: ``group`` splits the space into the groups of parameters that appear together (a
    #: conditional space), needs ``multivariate``; ``constant_liar`` makes points drawn while
    #: others train avoid those (on by default for multi-objective TPE in Optuna 5)
    multivariate: bool | None = None
    group: bool | None = None
    constant_liar: bool | None = None

    @model_validator(mode="after")
    def _tpe_only(self) -> SamplerConfig:
        tpe = ("multivariate", "group", "constant_liar", "n_startup_trials")
        set_ = [k for k in tpe if getattr(self, k) is not None]
        if self.name != "tpe" and set_:
            raise ValueError(
                f"{', '.join(set_)} only apply to name: tpe, but name={self.name!r}; remove "
                "them or use tpe"
            )
        if self.group and self.multivariate is False:
            raise ValueError(
                "group=true needs multivariate TPE, but multivariate=false; remove one"
            )
        return self


class HypervolumeConfig(StrictModel):
    """The reference point of the search's hypervolume (``search.hypervolume``): per objective
    metric, the worst value that still counts. Unset metrics take their bound: accuracy 0,
    MACs the budget (or the most MACs validation saw in the space); other objectives have no
    bound and must be set here for the hypervolume to be logged."""

    reference: dict[str, float] = Field(default_factory=dict)

    @field_validator("reference")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        for metric, value in v.items():
            if metric not in M.OBJECTIVES:
                raise ValueError(
                    f"reference.{metric}: unknown objective metric; choose from "
                    f"{sorted(M.OBJECTIVES)}"
                )
            if not math.isfinite(value):
                raise ValueError(f"reference.{metric}={value} must be a finite number")
            if metric == M.VAL_ACCURACY and not 0 <= value < 1:
                raise ValueError(
                    f"reference.{metric}={value} must be in [0, 1) (an accuracy); e.g. 0.0"
                )
            if metric != M.VAL_ACCURACY and value <= 0:
                raise ValueError(
                    f"reference.{metric}={value} must be above 0 (a cost no network beats "
                    "cannot bound the front); e.g. the budget"
                )
        return v


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
                       r"(?:(\d+(?:\.\d+)?)s)?")  # fmt: skip


def duration_s(text: str) -> float:
    """Seconds of ``"8h"``, ``"90m"``, ``"1h30m"``, ``"45s"``, ``"2d"`` (ValueError otherwise)."""
    match = _DURATION.fullmatch(text.strip().replace(" ", ""))
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(
            f'time={text!r} is not a duration; write it as e.g. "8h", "90m", "1h30m", "45s" or "2d"'
        )
    d, h, m, s = (float(g) if g else 0.0 for g in match.groups())
    seconds = ((d * 24 + h) * 60 + m) * 60 + s
    if seconds <= 0:
        raise ValueError(f"time={text!r} must be longer than 0 seconds")
    return seconds


class StopConfig(StrictModel):
    """Budgets that end a search besides ``num_trials``: trial epochs (every trial's epochs,
    references included) and wall-clock time (of every launch and resume together). The first
    spent ends the search: no trial starts, running ones stop at the end of their current epoch
    (resumable, if the budget is raised), and the front is ranked."""

    epochs: int | None = Field(None, ge=1)
    time: str | None = None

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            duration_s(v)
        return v

    @property
    def seconds(self) -> float | None:
        return None if self.time is None else duration_s(self.time)


class Resources(StrictModel):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class RayConfig(StrictModel):
    address: str | None = None
    dashboard: bool = True
    dashboard_port: int = 8265
    num_cpus: int | None = Field(None, ge=1)


class MlflowConfig(StrictModel):
    tracking_uri: str | None = None
    experiment: str | None = None
    register_models: bool = True


class Budget(StrictModel):
    macs: float | None = Field(None, gt=0)


class References(StrictModel):
    """Reference trials trained next to the searched ones, by the same recipe, ranked on the
    same front: the dense network of the model's family and its static group convolution at
    each gate factor in ``static_group``. They show what the searched networks must beat."""

    dense: bool = True
    static_group: list[float] = Field(default_factory=list)

    @field_validator("static_group")
    @classmethod
    def _gates(cls, v: list[float]) -> list[float]:
        bad = [g for g in v if not 0 < g <= 1]
        if bad:
            raise ValueError(f"gate factors {bad} must be in (0, 1] (the kept share of channels)")
        return v


class Pretrain(StrictModel):
    """Train the dense network of the searched model's family once, for ``epochs`` epochs by
    the trial recipe, and start every searched trial from it (``trial.init_from``)."""

    epochs: int = Field(ge=1)


class SchedulerConfig(StrictModel):
    """Early stopping across trials: ``mo-asha`` (multi-objective asynchronous successive
    halving, search/scheduler.py). Rungs at epochs grace_period * reduction_factor**k below
    ``trial.epochs``; about 1 in reduction_factor trials goes on at each rung."""

    name: Literal["mo-asha"]
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1, allow_inf_nan=False)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # fullmatch: "$" let a newline through


class ExperimentConfig(StrictModel):
    """A search: fixed trial settings, the space, objectives, sampler, resources, tracking."""

    name: str
    trial: TrialConfig = Field(default_factory=TrialConfig)
    space: SearchSpace
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric=M.VAL_ACCURACY), Objective(metric=M.MACS)],
        min_length=1,
    )
    budget: Budget = Field(default_factory=Budget)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    num_trials: int = Field(20, ge=1)
    stop: StopConfig = Field(default_factory=StopConfig)
    hypervolume: HypervolumeConfig = Field(default_factory=HypervolumeConfig)
    concurrency: int | None = Field(None, ge=1)
    resources: Resources = Field(default_factory=Resources)
    scheduler: SchedulerConfig | None = None
    references: References | None = None
    pretrain: Pretrain | None = None
    max_failures: int = Field(1, ge=0)
    warm_start: list[dict[str, Any]] = Field(default_factory=list)
    storage_dir: str = "runs"
    optuna_storage: str | None = (
        None  # RDB URL or journal:///path.log; default sqlite in the folder
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError(
                f"name={v[:120]!r} must be 1 to 100 letters, digits, '_', '.', '-', starting "
                "with a letter or digit (it names folders, the Optuna study and the registered "
                "model)"
            )
        return v

    @model_validator(mode="after")
    def _warm_start_keys(self) -> ExperimentConfig:
        for i, point in enumerate(self.warm_start):
            unknown = set(point) - set(self.space.params)
            if unknown:
                raise ValueError(
                    f"warm_start[{i}] sets {sorted(unknown)}, which are not "
                    f"parameters of the space ({sorted(self.space.params)})"
                )
        return self

    @model_validator(mode="after")
    def _scheduler_fits(self) -> ExperimentConfig:
        s, epochs = self.scheduler, self.trial.epochs
        if s is None:
            return self
        if s.grace_period >= epochs:
            raise ValueError(
                f"scheduler.grace_period={s.grace_period} is not below trial.epochs={epochs}: "
                "there would be no rung, so nothing would ever be stopped; lower grace_period "
                "or raise trial.epochs"
            )
        if "epochs" in self.space.params:
            raise ValueError(
                "the space searches 'epochs' but scheduler rungs are fixed by trial.epochs; "
                "remove epochs from the space, or the scheduler section"
            )
        return self

    @model_validator(mode="after")
    def _one_pretraining(self) -> ExperimentConfig:
        if self.pretrain is not None and self.trial.pretrain_epochs:
            raise ValueError(
                f"pretrain (once per search) and trial.pretrain_epochs="
                f"{self.trial.pretrain_epochs} (once per trial) both pretrain; keep one"
            )
        return self

    @model_validator(mode="after")
    def _teacher_known(self) -> ExperimentConfig:
        why = self.trial.teacher_missing(search_pretrains=self.pretrain is not None)
        if why is not None:
            raise ValueError(f"trial.{why}")
        return self

    @model_validator(mode="after")
    def _budget_fits_a_trial(self) -> ExperimentConfig:
        n, epochs = self.stop.epochs, self.trial.epochs
        if n is not None and n < epochs:
            raise ValueError(
                f"stop.epochs={n} is below trial.epochs={epochs}: no trial could finish, so "
                f"the search would have no front; give at least {epochs} (one full trial)"
            )
        return self

    @model_validator(mode="after")
    def _reference_of_objectives(self) -> ExperimentConfig:
        metrics = [o.metric for o in self.objectives]
        extra = sorted(set(self.hypervolume.reference) - set(metrics))
        if extra:
            raise ValueError(
                f"hypervolume.reference sets {extra}, which are not objectives ({metrics}); "
                "remove them"
            )
        return self

    @property
    def experiment_dir(self) -> Path:
        return (Path(self.storage_dir).expanduser() / self.name).resolve()


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override (``--set``), resolve ``space: file.yaml`` and validate an experiment."""
    source = str(path)
    doc = apply_overrides(load_yaml(path), overrides or [], source)
    doc.setdefault("name", Path(path).stem)
    if isinstance(doc.get("space"), str):
        try:
            space_path = resolve_space_path(doc["space"], Path(path).parent)
            doc["space"] = load_space(space_path).model_dump()
        except SpaceError as err:
            raise SearchConfigError(f"{source}: space: {err}") from err
    try:
        return ExperimentConfig.model_validate(doc)
    except ValidationError as err:
        raise SearchConfigError(format_validation_error(err, source)) from err
