"""Tune's state files, kept whole through a save cut short (search/tune_backup.py)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from search.tune_backup import BACKUP_DIR
from search.tune_backup import StateBackup
from search.tune_backup import complete
from search.tune_backup import restore_cut_short

RAN = []


def _record(x: str) -> str:
    RAN.append(x)
    return x


class _Runs:
    """Unpickling it calls ``_record``: a check that reads a pickle must never run this."""

    def __reduce__(self) -> tuple:
        return (_record, ("unpickled",))


def _run(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    run = tmp_path / "tune"
    run.mkdir()
    state = json.dumps({"trial_data": ["t" * 5000], "runner_data": {}}).encode()
    searcher = pickle.dumps({"searcher": [1, 2, 3]})
    (run / "experiment_state-2026-12-07_10-00-00.json").write_bytes(state)
    (run / "searcher-state-2026-12-07_10-00-00.pkl").write_bytes(searcher)
    return run, state, searcher


def test_complete_tells_whole_files_from_ones_cut_short_without_unpickling(tmp_path):
    files = {
        "a.json": (b'{"a": [1, 2]}', True),
        "b.json": (b'{"a": [1, 2', False),
        "c.json": (b"", False),
        "d.pkl": (pickle.dumps(_Runs()), True),
        "e.pkl": (pickle.dumps({"k": list(range(100))})[:-5], False),
        "f.pkl": (b"", False),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    assert {n: complete(tmp_path / n) for n in files} == {n: w for n, (_, w) in files.items()}
    assert not complete(tmp_path / "missing.json")
    assert RAN == []


def test_a_state_file_cut_short_is_put_back_from_its_last_complete_copy(tmp_path):
    run, state, searcher = _run(tmp_path)
    backup = StateBackup()
    backup.keep(run)
    live = run / "experiment_state-2026-12-07_10-00-00.json"
    assert (run / BACKUP_DIR / live.name).read_bytes() == state
    assert (run / BACKUP_DIR / "searcher-state-2026-12-07_10-00-00.pkl").read_bytes() == searcher

    live.write_bytes(state[:1000])  # a full disk during Tune's copy
    backup.keep(run)  # a file cut short never replaces its last complete copy
    assert (run / BACKUP_DIR / live.name).read_bytes() == state

    assert restore_cut_short(run) == [live]
    assert live.read_bytes() == state
    assert (run / f"{live.name}.damaged").read_bytes() == state[:1000]
    assert restore_cut_short(run) == []  # whole files are left alone


def test_a_newer_complete_save_replaces_the_copy_and_nothing_damaged_is_lost(tmp_path):
    run, state, _ = _run(tmp_path)
    live = run / "experiment_state-2026-12-07_10-00-00.json"
    backup = StateBackup()
    backup.keep(run)
    newer = json.dumps({"trial_data": ["u" * 6000], "runner_data": {}}).encode()
    live.write_bytes(newer)
    backup.keep(run)
    assert (run / BACKUP_DIR / live.name).read_bytes() == newer
    for cut in (b"{", b'{"t'):  # cut short twice: both damaged files are kept
        live.write_bytes(cut)
        assert restore_cut_short(run) == [live] and live.read_bytes() == newer
    assert (run / f"{live.name}.damaged").read_bytes() == b"{"
    assert (run / f"{live.name}.damaged-2").read_bytes() == b'{"t'


def test_a_damaged_file_without_a_complete_copy_stays_for_the_checks_to_refuse(tmp_path):
    run, state, _ = _run(tmp_path)
    live = run / "experiment_state-2026-12-07_10-00-00.json"
    live.write_bytes(state[:10])  # cut short before any copy was taken
    StateBackup().keep(run)
    assert not (run / BACKUP_DIR / live.name).exists()
    assert restore_cut_short(run) == [] and live.read_bytes() == state[:10]
    assert restore_cut_short(tmp_path / "no-such-run") == []
