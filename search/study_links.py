"""The links between a search's Optuna studies and its MLflow runs, for optuna-dashboard.

Each Optuna trial carries its MLflow run id from the moment it is told (``RunFinder``, given to
the searcher). What is known only once the search is ranked, the front and its registry
aliases, cannot go into user attributes: Optuna refuses to change a finished trial. It goes
into optuna-dashboard's notes (``optuna_dashboard.save_note``, kept in the study's system
attributes): the study's note is the front (the table of ``pareto.md``) and the MLflow link;
each ranked trial's note says where it stands, how to load it and where its MLflow run is.
``launch`` and ``pareto`` rewrite them (a note edited in the dashboard is replaced).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna

from search import names as N
from search.redact import redact
from search.study import StudyRef
from search.study import storage_of
from search.tracking import Tracking

log = logging.getLogger(__name__)


class RunFinder:
    """The MLflow child run of a Ray trial id, for the searcher (which Tune pickles with the
    experiment: the MLflow client is reopened after a restore)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str) -> None:
        self.spec = (uri, experiment, parent_run_id)
        self._tracking: Tracking | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "_tracking": None}

    def __call__(self, trial_id: str) -> str | None:
        if self._tracking is None:
            self._tracking = Tracking(*self.spec)
        return self._tracking.find_child(trial_id)


def annotate_studies(
    tracking: Tracking, ref: StudyRef, registered_name: str, front_md: str, link: str
) -> None:
    """The notes of the searched study, of its references' study and of their ranked trials:
    ``front_md`` (the title and table of ``pareto.md``), ``link`` (where the front's runs are in
    the MLflow UI) and each front model's ``models:/<registered_name>@<alias>``."""
    from optuna_dashboard import save_note

    runs = {r.data.tags[N.TRIAL_TAG]: r for r in tracking.children() if N.TRIAL_TAG in r.data.tags}
    for study_ref, what in ((ref, "searched"), (ref.references, "reference")):
        study = _load(study_ref)
        if study is None:
            continue
        save_note(study, _study_note(ref, what, front_md, link))
        for t in study.get_trials(deepcopy=False):
            run = runs.get(t.user_attrs.get(N.TRIAL_TAG))
            if run is not None and N.PARETO_TAG in run.data.tags:
                # A finished trial as an optuna.Trial only to address its note (RandomSampler:
                # constructing it asks the sampler nothing).
                note = _trial_note(tracking, run, registered_name)
                save_note(optuna.Trial(study, t._trial_id), note)  # noqa: SLF001


def _load(ref: StudyRef) -> optuna.Study | None:
    if ref.storage.startswith("sqlite:///"):
        path = Path(ref.storage.removeprefix("sqlite:///"))
        if not path.is_file():  # e.g. `pareto` on a copy of a folder whose original is gone
            log.warning("no Optuna study at %s: its notes are not written", path)
            return None
    try:
        return optuna.load_study(
            study_name=ref.name,
            storage=storage_of(ref.storage),
            sampler=optuna.samplers.RandomSampler(),
        )
    except KeyError:  # a search without references has no references' study
        return None


def _study_note(ref: StudyRef, what: str, front_md: str, link: str) -> str:
    if what == "searched":
        about = (
            f"The searched trials of `{ref.name}`. Its reference trials (the dense and static "
            f"group networks, trained by the same recipe; no parameters of the space) are in "
            f"the study `{ref.references.name}`, so parameter importance here covers the "
            "searched trials only."
        )
    else:
        about = (
            f"The reference trials of the search `{ref.name}` (its searched trials are in the "
            f"study `{ref.name}`), ranked with them on one front."
        )
    return f"{about}\n\n{front_md}\n\n{link}\n"


def _trial_note(tracking: Tracking, run: Any, registered_name: str) -> str:
    tags, label = run.data.tags, run.info.run_name
    if tags.get(N.PARETO_TAG) == "true":
        alias = tags.get(N.REGISTERED_ALIAS_TAG)
        load = (
            f' Load it with `mlflow.pytorch.load_model("models:/{registered_name}@{alias}")` '
            "after `import dgc`."
            if alias
            else ""
        )
        where = f"**{label} is on the Pareto front.**{load}"
    elif N.STOPPED_TAG in tags:
        where = f"{label} was stopped early at epoch {tags[N.STOPPED_TAG]}: never ranked."
    else:
        where = f"{label}: Pareto rank {tags.get(N.PARETO_RANK_TAG, '?')} (dominated)."
    return f"{where}\n\nMLflow run `{run.info.run_id}`: {_run_url(tracking, run.info.run_id)}\n"


def _run_url(tracking: Tracking, run_id: str) -> str:
    page = f"#/experiments/{tracking.experiment_id}/runs/{run_id}"
    if tracking.uri.startswith(("http://", "https://")):
        return f"{redact(tracking.uri.rstrip('/'))}/{page}"
    return (
        f"`mlflow ui --backend-store-uri {redact(tracking.uri)}`, then http://127.0.0.1:5000/{page}"
    )
