"""Tune's saved state, repaired before ``resume`` where a fault left it unusable.

Two faults that a long search meets leave Ray Tune 2.60 unable to restore its run, and
``resume`` repairs both before it reads anything, saying what it did:

- **A save cut short.** Tune writes its run state (``experiment_state-<session>.json``, the
  searcher's state, ``tuner.pkl``) in a staging folder and copies it over the copy in the
  search folder in place (pyarrow's ``copy_files``); a disk that fills during that copy leaves
  a truncated file where the last complete one was. ``StateBackup``, a Tune callback, copies
  each of those files once it is complete to ``<run>/.state-backup/`` (through a temporary
  file); ``restore_cut_short`` puts the last complete copy back in place of a damaged file and
  keeps the damaged one beside it as ``<name>.damaged``; a resumed run's first save, cut short
  before any copy of it was taken, is set aside so that Tune goes on from the session before.
- **A checkpoint the saved state names but ``num_to_keep`` removed.** A trial's new checkpoint
  replaces its previous one at once, while Tune records that in its saved state at its next
  save: a driver killed in between (SIGKILL, the OOM killer, a lost node) leaves a state whose
  trials restore from a folder that is gone, and each fails. ``restore_missing_checkpoints``
  copies the trial's newest checkpoint under the name the state expects; the trial goes on
  from where it really was (its epoch is in the checkpoint).

A state put back is at most one save behind what Tune had; ``resume`` already continues from
an older state (a SIGKILL leaves one): trials Tune had not recorded as finished go on from
their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pickletools
import shutil
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from search.tune_runs import TrialRecord
from search.tune_runs import records

log = logging.getLogger(__name__)

BACKUP_DIR = ".state-backup"
#: the run-level files Tune restores a run from (``search_gen_state`` is a pickle)
STATE_FILES = (
    "experiment_state-*.json",
    "search_gen_state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
    "tuner.pkl",
)
CHECKPOINT_GLOB = "checkpoint_*"


def state_files(run: Path) -> list[Path]:
    return sorted(p for pattern in STATE_FILES for p in run.glob(pattern) if p.is_file())


def complete(path: Path) -> bool:
    """Whether ``path`` holds a whole pickle or JSON document (a pickle is walked opcode by
    opcode, never unpickled)."""
    try:
        data = path.read_bytes()
        if data[:1] == b"\x80":  # a pickle's PROTO opcode
            ops = [op.name for op, _, _ in pickletools.genops(data)]  # raises if cut short
            return bool(ops) and ops[-1] == "STOP"
        json.loads(data)
        return True
    except (OSError, ValueError):  # unreadable, not JSON, a pickle cut short
        return False


def copy_atomic(source: Path, target: Path) -> None:
    """Copy through a temporary sibling: a full disk mid-copy leaves ``target`` as it was."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        if source.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
        else:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


class StateBackup(Callback):
    """Keeps the last complete copy of each of Tune's state files of the run it watches (the
    trials' experiment folder, on local storage)."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.seen: dict[str, tuple[int, int]] = {}  # file -> (mtime_ns, size) last copied
        self.last = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"every_s": self.every_s, "seen": {}, "last": 0.0}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if trials and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.keep(Path(trials[0].storage.experiment_fs_path))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if trials:  # after Tune's last save
            self.keep(Path(trials[0].storage.experiment_fs_path))

    def keep(self, run: Path) -> None:
        """Copy each state file of ``run`` that changed since its last copy and is complete
        (one being written is taken at a later step)."""
        if not run.is_dir():  # remote storage, or nothing saved yet
            return
        for path in state_files(run):
            try:
                stat = path.stat()
                sig = (stat.st_mtime_ns, stat.st_size)
                if self.seen.get(path.name) == sig or not complete(path):
                    continue
                (run / BACKUP_DIR).mkdir(exist_ok=True)
                copy_atomic(path, run / BACKUP_DIR / path.name)
                self.seen[path.name] = sig
            except OSError as err:  # a full disk: the last copy stays; Tune reports the disk
                log.debug("no backup of %s: %s", path, err)


def restore_cut_short(run: Path) -> list[Path]:
    """Put the last complete copy back for each state file of ``run`` that is damaged; the
    damaged file is kept as ``<name>.damaged``. Returns the files put back."""
    restored = []
    for copy in sorted((run / BACKUP_DIR).glob("*")):
        live = run / copy.name
        if not copy.is_file() or copy.name.startswith(".") or not live.exists():
            continue
        if complete(live) or not complete(copy):
            continue
        kept = _aside(live)
        os.replace(live, kept)
        copy_atomic(copy, live)
        restored.append(live)
        log.warning(
            "%s was cut short (a full disk during Tune's save?): its last complete copy, of "
            "%s, is used; the damaged file is kept as %s",
            live,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(copy.stat().st_mtime)),
            kept.name,
        )
    return restored


def set_aside_cut_short_session(run: Path) -> list[Path]:
    """A newest session whose ``experiment_state`` is cut short and has no complete copy (a
    disk that filled during the first save of a resumed run): its files are set aside (as
    ``<name>.damaged``) so that Tune restores the session before, if that one is whole.
    Returns the files set aside."""
    states = sorted(run.glob("experiment_state-*.json"))  # by session time
    if len(states) < 2 or complete(states[-1]) or not complete(states[-2]):
        return []
    session = states[-1].name.removeprefix("experiment_state-").removesuffix(".json")
    moved = []
    for path in sorted(run.glob(f"*-{session}.*")):
        if path.is_file() and path.suffix in (".json", ".pkl"):
            kept = _aside(path)
            os.replace(path, kept)
            moved.append(kept)
    log.warning(
        "%s was cut short (a full disk during Tune's save?) and has no complete copy: its "
        "session's files are set aside (%s); Tune goes on from %s",
        states[-1],
        ", ".join(p.name for p in moved),
        states[-2].name,
    )
    return moved


def _aside(live: Path) -> Path:
    """``<name>.damaged`` (``.damaged-2`` ... if an earlier one is there: none is lost)."""
    kept, n = live.with_name(live.name + ".damaged"), 1
    while kept.exists():
        n += 1
        kept = live.with_name(f"{live.name}.damaged-{n}")
    return kept


def restore_missing_checkpoints(records: list[TrialRecord]) -> list[Path]:
    """For each trial Tune will restore (not TERMINATED) whose saved checkpoint is gone, copy
    its newest checkpoint under that name. Returns the checkpoints put back."""
    restored = []
    for r in records:
        if r.status == "TERMINATED" or not r.checkpoint:
            continue
        wanted = Path(r.checkpoint)
        if wanted.exists() or not wanted.parent.is_dir():
            continue
        newer = sorted(
            p for p in wanted.parent.glob(CHECKPOINT_GLOB) if p.is_dir() and p.name > wanted.name
        )  # checkpoint_000002 > checkpoint_000001: Tune pads the index
        if not newer:
            continue
        copy_atomic(newer[-1], wanted)
        restored.append(wanted)
        log.warning(
            "trial %s: Tune's saved state names %s, which was replaced by %s before the stop "
            "(Tune had not saved since); the trial goes on from %s",
            r.trial_id,
            wanted.name,
            newer[-1].name,
            newer[-1].name,
        )
    return restored


def repair_saves(runs: list[Path]) -> list[Path]:
    """``restore_cut_short``, then ``set_aside_cut_short_session``, in each Tune run folder of
    a search (before anything reads them)."""
    return [p for run in runs for p in [*restore_cut_short(run), *set_aside_cut_short_session(run)]]


def repair_checkpoints_of(run: Path) -> list[Path]:
    """``restore_missing_checkpoints`` for the trials of a Tune run folder whose records no
    check has read (the pretraining's); one whose state cannot be read is left as it is."""
    try:
        saved = records(run)
    except Exception:  # noqa: BLE001  (Tune's restore names it)
        return []
    return restore_missing_checkpoints(saved)
