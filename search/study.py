"""The Optuna study of a search: its storage (an RDB URL or a journal file), its sampler as
the experiment file sets it, its reference trials' study beside it, and the warm-start points
a new study begins with. The searcher (search.searcher) asks and tells it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.study import StudyDirection

from search.config import ExperimentConfig
from spaces.convert import param_names

#: the study of the reference trials: the searched study's name and this suffix
REFERENCES_SUFFIX = ".references"
SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
    "random": optuna.samplers.RandomSampler,
}


def make_sampler(exp: ExperimentConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The experiment's sampler. ``offset`` (the trials a study already holds) shifts the
    seed: a resumed search must not replay the suggestions it began with."""
    s = exp.sampler
    kwargs: dict[str, Any] = {"seed": None if s.seed is None else (s.seed + offset) % 2**32}
    if s.name == "nsgaii" and s.population_size:
        kwargs["population_size"] = s.population_size
    if s.name == "tpe":
        options = ("n_startup_trials", "multivariate", "group", "constant_liar")
        kwargs.update({k: getattr(s, k) for k in options if getattr(s, k) is not None})
        if s.group and s.multivariate is None:
            kwargs["multivariate"] = True  # group needs it (Optuna's default may change)
    return SAMPLERS[s.name](**kwargs)


@dataclass(frozen=True)
class StudyRef:
    storage: str
    name: str

    @property
    def references(self) -> StudyRef:
        """The study of the search's reference trials, next to this one."""
        return StudyRef(self.storage, self.name + REFERENCES_SUFFIX)


def storage_of(url: str) -> str | optuna.storages.BaseStorage:
    """An RDB URL as is (``sqlite:///...``, ``postgresql://...``), or ``journal:///path.log``
    for Optuna's journal file storage (NFS-friendly, no database)."""
    if url.startswith("journal://"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    return url


def open_study(exp: ExperimentConfig, ref: StudyRef) -> optuna.Study:
    """Create or load the study; warm-start points are enqueued only into a new study."""
    directions = [
        StudyDirection.MAXIMIZE if o.direction == "max" else StudyDirection.MINIMIZE
        for o in exp.objectives
    ]
    study = optuna.create_study(
        storage=storage_of(ref.storage),
        study_name=ref.name,
        directions=directions,
        sampler=make_sampler(exp),
        load_if_exists=True,
    )
    if study.trials:  # loaded: reseed past what the first sampler already drew
        study.sampler = make_sampler(exp, offset=len(study.trials))
    with warnings.catch_warnings():  # experimental since Optuna 3.2, still fine in 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.metric for o in exp.objectives])
    return study


def enqueue_warm_start(study: optuna.Study, exp: ExperimentConfig, num_stages: int) -> None:
    if study.trials:
        return
    for point in exp.warm_start:
        params = {}
        for key, value in point.items():
            spec = exp.space.params[key]
            for i, name in enumerate(param_names(key, spec.per_stage, num_stages)):
                params[name] = value[i] if isinstance(value, list) and spec.per_stage else value
        study.enqueue_trial(params, skip_if_exists=True)
