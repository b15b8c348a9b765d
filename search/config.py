"""ExperimentConfig: one YAML file describes a whole search (validated, unknown keys rejected)."""

from __future__ import annotations

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
