"""Tune's state files, kept whole through a save cut short (search.tune_repair.py)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from search.tune_repair import BACKUP_DIR
from search.tune_repair import StateBackup
from search.tune_repair import complete
from search.tune_repair import repair_saves
from search.tune_repair import restore_cut_short
from search.tune_repair import restore_missing_checkpoints
from search.tune_runs import TrialRecord

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
    (run / "search_gen_state-2026-12-07_10-00-00.json").write_bytes(searcher)  # Tune's pickle
    return run, state, searcher


def test_complete_tells_whole_files_from_ones_cut_short_without_unpickling(tmp_path):
    files = {
        "a.json": (b'{"a": [1, 2]}', True),
        "b.json": (b'{"a": [1, 2', False),
        "c.json": (b"", False),
        "pickle.json": (pickle.dumps([1, 2]), True),  # Tune names some pickles .json
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
    for name in (
        "searcher-state-2026-12-07_10-00-00.pkl",
        "search_gen_state-2026-12-07_10-00-00.json",
    ):
        assert (run / BACKUP_DIR / name).read_bytes() == searcher

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


def _checkpoint(trial: Path, n: int, epoch: int) -> Path:
    path = trial / f"checkpoint_{n:06d}"
    path.mkdir(parents=True)
    (path / "state.pt").write_text(f"epoch {epoch}")
    return path


def test_a_checkpoint_the_saved_state_names_but_a_newer_replaced_is_put_back(tmp_path):
    trial = tmp_path / "trial_a"
    newer = _checkpoint(trial, 3, epoch=3)
    wanted = trial / "checkpoint_000002"  # removed when checkpoint_000003 was written
    records = [TrialRecord("a", "PAUSED", path=str(trial), checkpoint=str(wanted))]
    assert restore_missing_checkpoints(records) == [wanted]
    assert (wanted / "state.pt").read_text() == "epoch 3" and newer.is_dir()
    assert restore_missing_checkpoints(records) == []  # there now


def test_only_a_missing_checkpoint_of_a_trial_tune_restores_is_replaced_by_a_newer_one(tmp_path):
    done, older, gone = tmp_path / "done", tmp_path / "older", tmp_path / "gone"
    _checkpoint(done, 3, epoch=3)
    _checkpoint(older, 1, epoch=1)
    records = [
        TrialRecord("d", "TERMINATED", checkpoint=str(done / "checkpoint_000002")),
        TrialRecord("o", "ERROR", checkpoint=str(older / "checkpoint_000002")),  # none newer
        TrialRecord("g", "PAUSED", checkpoint=str(gone / "checkpoint_000002")),  # no folder
        TrialRecord("n", "PENDING"),  # no checkpoint yet
    ]
    assert restore_missing_checkpoints(records) == []
    assert not (done / "checkpoint_000002").exists()
    assert sorted(p.name for p in older.iterdir()) == ["checkpoint_000001"]


def test_a_resumed_runs_first_save_cut_short_is_set_aside_for_the_session_before(tmp_path):
    run, state, searcher = _run(tmp_path)  # session 10-00-00, whole (no copy taken: none kept)
    later = "2026-12-07_11-00-00"
    (run / f"experiment_state-{later}.json").write_bytes(state[:100])  # cut short
    (run / f"searcher-state-{later}.pkl").write_bytes(searcher)
    assert repair_saves([run]) == [
        run / f"experiment_state-{later}.json.damaged",
        run / f"searcher-state-{later}.pkl.damaged",
    ]
    assert sorted(p.name for p in run.glob("experiment_state-*.json")) == [
        "experiment_state-2026-12-07_10-00-00.json"  # what Tune restores now
    ]
    (run / "experiment_state-2026-12-07_10-00-00.json").write_bytes(state[:100])
    assert repair_saves([run]) == []  # no whole session to go back to: left to the checks
