"""A search folder's state, checked before ``resume`` runs anything: a damaged or missing
study, Tune state, scheduler record, pretrained network or tracking store is refused with the
file, what is wrong with it and how to recover. Nothing is changed by the checks but a write to
the study's SQLite file that a killed process left unfinished, which SQLite rolls back.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

from search.overrides import SearchConfigError
from search.redact import redact
from search.scheduler import STATE_FILE as MO_ASHA_FILE
from search.state import STATE_FILE
from search.state import SearchState
from search.tracking import Tracking
from search.tune_runs import TrialRecord
from search.tune_runs import records
from search.tune_runs import segments

log = logging.getLogger(__name__)


def recovery(folder: Path) -> str:
    return (
        "Nothing was changed. Restore it from a backup and run the command again; or rank "
        f"the trials trained so far (MLflow keeps them all) with `python -m search pareto "
        f"{folder}`; or launch the experiment again under another name"
    )


def check_folder(folder: Path, state: SearchState) -> list[TrialRecord]:
    """Refuse a damaged folder (SearchConfigError); return what Tune saved of its trials."""
    tune = tune_records(folder)
    check_study(folder, state, progressed=bool(tune))
    for path in segments(folder):
        check_json(path / MO_ASHA_FILE, "delete it: early stopping then starts its records "
                   "afresh (trials it stopped stay stopped)")  # fmt: skip
    check_weights(folder / "pretrain.pt")
    return tune


def tune_records(folder: Path) -> list[TrialRecord]:
    out = []
    for path in segments(folder):
        try:
            out += records(path)
        except Exception as err:
            raise SearchConfigError(
                f"{path}: Tune's saved state cannot be read ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''}). {recovery(folder)}"
            ) from err
    return out


def check_study(folder: Path, state: SearchState, progressed: bool) -> None:
    """The study must be readable and hold ``state.study_name`` once Tune has trials;
    before that a missing study is created by the run, as at launch."""
    url, shown = state.optuna_storage, redact(state.optuna_storage)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise SearchConfigError(
                f"{folder / STATE_FILE}: optuna_storage = {shown}: the folder {path.parent} "
                f"does not exist (moved or deleted?). {recovery(folder)}"
            )
        if not _sqlite_readable(path, progressed, folder):
            return
    elif url.startswith("journal://") and not Path(url.removeprefix("journal://")).is_file():
        if progressed:
            raise SearchConfigError(f"{shown}: the study's journal is missing. {recovery(folder)}")
        return
    _check_study_in(url, state.study_name, progressed, folder)


def _sqlite_readable(path: Path, progressed: bool, folder: Path) -> bool:
    """False if there is no study file yet and none is needed."""
    what = None
    if not path.exists():
        what = "missing"
    elif path.stat().st_size == 0:
        what = "empty (0 bytes)"
    if what is not None:
        if progressed:
            raise SearchConfigError(
                f"{path}: {what}, but it holds the Optuna study of this search, whose trials "
                f"Tune has under {folder}. {recovery(folder)}"
            )
        return False
    rows = _quick_check(path, "?mode=ro")
    if "readonly" in rows[0][0] and Path(f"{path}-journal").exists():
        # A process killed mid-write (SIGKILL of the driver) left a hot journal, which only a
        # writable connection rolls back: SQLite's own recovery, which Optuna's first
        # connection would make anyway; the database then holds its last committed state.
        log.info("%s: rolling back the write a stopped process left unfinished", path)
        rows = _quick_check(path, "")
    if rows != [("ok",)]:
        raise SearchConfigError(
            f"{path}: the study's database is damaged ({rows[0][0][:200]}). {recovery(folder)}"
        )
    return True


def _quick_check(path: Path, mode: str) -> list[tuple[str]]:
    """SQLite's ``quick_check`` of ``path`` (``[("ok",)]``), or the error opening it."""
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}{mode}", uri=True)) as con:
            return con.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as err:
        return [(str(err),)]


def _check_study_in(url: str, name: str, progressed: bool, folder: Path) -> None:
    import optuna

    from search.study import storage_of

    try:
        names = optuna.get_all_study_names(storage_of(url))
    except Exception as err:
        raise SearchConfigError(
            f"{redact(url)}: the study storage cannot be read "
            f"({redact(str(err)).splitlines()[0][:200]}). {recovery(folder)}"
        ) from err
    if progressed and name not in names:
        raise SearchConfigError(
            f"{redact(url)} holds no study {name!r} (it holds {sorted(names)[:5]}), but Tune "
            f"has trials of it under {folder}. {recovery(folder)}"
        )


def check_json(path: Path, fix: str) -> None:
    if not path.exists():
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SearchConfigError(f"{path}: damaged ({str(err)[:200]}); {fix}") from err


def check_weights(path: Path) -> None:
    if not path.exists():
        return
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SearchConfigError(
            f"{path}: the pretrained network is damaged ({str(err).splitlines()[0][:200]}); "
            "delete it: resume then takes it again from the pretraining run"
        ) from err


def check_tracking_store(state: SearchState, folder: Path) -> None:
    """A SQLite tracking store must still be there (MLflow would create an empty one)."""
    uri = state.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SearchConfigError(
            f"{folder / STATE_FILE}: the MLflow store {uri} of this search is missing (moved "
            "or deleted?); put it back where it was, then run the command again"
        )


def check_parent_run(tracking: Tracking, state: SearchState, folder: Path) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tracking.client.get_run(state.parent_run_id)
    except MlflowException as err:
        raise SearchConfigError(
            f"{folder / STATE_FILE}: the tracking store {redact(state.tracking_uri)} has no "
            f"run {state.parent_run_id!r}, the search's parent run ({err.error_code}): its "
            "runs were deleted, or the store was replaced"
        ) from err
