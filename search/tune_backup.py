"""Tune's saved state, kept whole through a write that a full disk cuts short.

Ray Tune 2.60 writes its run state (``experiment_state-<session>.json``, the searcher's and
callbacks' state) in a staging folder and copies it over the copy in the search folder in
place (pyarrow's ``copy_files``). A disk that fills during that copy leaves a truncated file
where the last complete one was, and Tune cannot restore the run from it.

``StateBackup``, a Tune callback, copies each of those files once it is complete (it parses)
to ``<run>/.state-backup/`` through a temporary file; ``restore_cut_short``, which ``resume``
calls before it reads anything, puts the last complete copy back in place of a damaged file
and keeps the damaged one beside it as ``<name>.damaged``. The copy is at most a save behind
what Tune had; ``resume`` already continues from an older state (a SIGKILL leaves one): trials
Tune had not recorded as finished go on from their last checkpoint.
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

log = logging.getLogger(__name__)

BACKUP_DIR = ".state-backup"
#: the run-level files Tune restores a run from
STATE_FILES = (
    "experiment_state-*.json",
    "search_gen_state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
    "tuner.pkl",
)


def state_files(run: Path) -> list[Path]:
    return sorted(p for pattern in STATE_FILES for p in run.glob(pattern) if p.is_file())


def complete(path: Path) -> bool:
    """Whether ``path`` holds a whole JSON document or pickle (read, never unpickled)."""
    try:
        data = path.read_bytes()
        if path.suffix == ".json":
            json.loads(data)
            return True
        ops = [op.name for op, _, _ in pickletools.genops(data)]  # stops at STOP, else raises
        return bool(ops) and ops[-1] == "STOP"
    except (OSError, ValueError):  # unreadable, not JSON, a pickle cut short
        return False


def copy_atomic(source: Path, target: Path) -> None:
    """Copy through a temporary sibling: a full disk mid-copy leaves ``target`` as it was."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class StateBackup(Callback):
    """Keeps the last complete copy of each of Tune's state files of the run it watches (the
    run folder is the trials' experiment folder on local storage)."""

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
        if trials:
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


def _aside(live: Path) -> Path:
    """``<name>.damaged`` (``.damaged-2`` ... if an earlier one is there: none is lost)."""
    kept, n = live.with_name(live.name + ".damaged"), 1
    while kept.exists():
        n += 1
        kept = live.with_name(f"{live.name}.damaged-{n}")
    return kept
