"""The search folder's lock, held by a real second process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from search.lock import SearchLock
from search.overrides import SearchConfigError

HOLD = (
    "import sys, time; from pathlib import Path; from search.lock import SearchLock\n"
    "with SearchLock(Path(sys.argv[1]), 'x'):\n"
    "    print('held', flush=True); time.sleep(120)\n"
)


def test_a_second_command_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    folder = tmp_path / "runs" / "x"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(
            SearchConfigError,
            match=rf"is in use by another command \(pid "
            rf"{holder.pid} on .*, since .*Wait for it to end, then again",
        ):
            with SearchLock(folder, "again"):
                pass  # fmt: skip
    finally:
        holder.kill()  # SIGKILL: no clean-up in the holder; the kernel drops its lock
        holder.wait()
    with SearchLock(folder, "again"):
        assert (folder / ".lock.owner").is_file()
    assert not (folder / ".lock.owner").exists()


def test_a_command_that_fails_before_writing_leaves_no_folder_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with SearchLock(tmp_path / "runs" / "x", "again"):
            raise RuntimeError("refused")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "kept").mkdir()
    with SearchLock(tmp_path / "kept" / "x", "again"):
        (tmp_path / "kept" / "x" / "search.json").write_text("{}")
    assert (tmp_path / "kept" / "x" / "search.json").is_file()  # what a command wrote stays


def test_a_file_where_the_folder_goes_is_named(tmp_path):
    (tmp_path / "runs").write_text("a file\n")
    with pytest.raises(SearchConfigError, match="cannot be a search folder"):
        with SearchLock(tmp_path / "runs" / "x", "again"):
            pass
