"""One search per folder at a time: ``launch``, ``resume`` and ``pareto`` hold an exclusive
file lock (``<folder>/.lock``, an ``flock`` through filelock) while they run.

The kernel drops the lock when its process ends, however it ends (Ctrl-C, SIGKILL, a crash), so
a lock is never stale. Who holds it (pid, host, command, start time) is written next to it, in
``.lock.owner``, for the message that a second command gets.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

import filelock

from search.overrides import SearchConfigError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"


class SearchLock:
    """The exclusive lock of a search folder; ``with SearchLock(folder, what):``.

    Entering creates the folder (and its parents) if needed and fails at once, with a
    SearchConfigError naming the holder, if another process holds it. A folder this lock
    created is removed again on exit if nothing else was written into it (a launch refused
    before it wrote anything leaves nothing behind).
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.folder, self.what = folder, what
        self._lock = filelock.FileLock(str(folder / LOCK_FILE), timeout=0)
        self._created: list[Path] = []

    def __enter__(self) -> SearchLock:
        self._make_folder()
        try:
            self._lock.acquire()
        except filelock.Timeout:
            self._remove_created()
            raise SearchConfigError(self._busy_message()) from None
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["python -m search", *sys.argv[1:]])[:500],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (self.folder / OWNER_FILE).write_text(json.dumps(owner))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            (self.folder / OWNER_FILE).unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the folder was removed meanwhile: the lock goes with the process anyway
        self._lock.release()
        self._remove_created()

    def _make_folder(self) -> None:
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise SearchConfigError(
                f"{self.folder}: cannot be a search folder ({err.strerror}: a file stands "
                "in its place); choose another storage_dir or name"
            ) from err
        self._created = missing  # deepest first

    def _remove_created(self) -> None:
        """Remove the folders this lock created if they hold nothing but the lock file."""
        if not self._created:
            return
        if {p.name for p in self.folder.iterdir()} <= {LOCK_FILE}:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
            for path in self._created:
                try:
                    path.rmdir()
                except OSError:
                    break  # not empty: something else lives there now
        self._created = []

    def _busy_message(self) -> str:
        try:
            owner = json.loads((self.folder / OWNER_FILE).read_text())
            who = (
                f"pid {owner['pid']} on {owner['host']}, `{owner['command']}`, since "
                f"{owner['since']}"
            )
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        return (
            f"{self.folder} is in use by another command ({who}); one search runs in a folder "
            f"at a time. Wait for it to end, then {self.what}"
        )
