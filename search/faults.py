"""What stopped a search, in one line, and the faults that stop it at once.

A full disk fails every trial the same way (no checkpoint can be written), so the first trial
error that says so ends the run, as a SIGTERM would: everything Tune saved stays, and
``resume`` continues once there is space again.
"""

from __future__ import annotations

import errno
import logging
import traceback
from pathlib import Path
from typing import Any

from ray.tune import Callback

from search.interrupt import Stop
from search.redact import redact
from search.tracking import error_line
from search.tracking import error_text

#: what a full disk looks like in an error text (OSError, SQLite, pyarrow, torch)
DISK_FULL = ("No space left on device", "database or disk is full", "disk is full")
ERROR_LOG = "driver-error.log"


def disk_full(text: str) -> bool:
    return any(s in text for s in DISK_FULL)


def describe(err: BaseException) -> str:
    """The cause of ``err`` in one line: the full disk if any exception in its chain says so,
    else its last exception's type and first line."""
    seen: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in seen:
        seen.append(e)
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or disk_full(str(e)):
            return f"the disk is full ({_first_line(e)})"
        e = e.__cause__ or e.__context__
    return _first_line(err)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return redact(f"{type(e).__name__}: {text[0] if text else ''}")[:300]


def save_traceback(err: BaseException, folder: Path) -> Path | None:
    """The full traceback in ``<folder>/driver-error.log`` (None if it cannot be written)."""
    path = folder / ERROR_LOG
    try:
        text = "".join(traceback.format_exception(err))
        with open(path, "a", encoding="utf-8") as f:
            f.write(redact(text) + "\n")
    except OSError:
        return None
    return path


class FullDiskFilter(logging.Filter):
    """A handler filter that turns a record whose exception is a full disk into one line
    (Tune's "Saving experiment state ... failed with exception" comes with a traceback):
    the search says once, as it stops, what happened and how to go on."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if err is not None and (cause := describe(err)).startswith("the disk is full"):
            record.msg, record.args = f"{record.getMessage().rstrip(': ')}: {cause}", None
            record.exc_info, record.exc_text = None, None
        return True


class FaultWatch(Callback):
    """Ends the Tune run (``Stop.fail``) at the first trial error that says the disk is full."""

    def __init__(self, stop: Stop) -> None:
        self.stop: Stop | None = stop

    def __getstate__(self) -> dict[str, Any]:
        return {"stop": None}

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def _check(self, trial: Any) -> None:
        text = error_text(trial)
        if self.stop is not None and disk_full(text):
            self.stop.fail(f"the disk is full ({redact(error_line(text))[:300]})")
