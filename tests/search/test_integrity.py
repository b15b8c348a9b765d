"""The checks of a search folder before a resume (search/integrity.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import optuna

from search.integrity import check_study

KILLED_MID_WRITE = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size=1")  # the write spills into the file before the commit
con.execute("BEGIN")
con.execute("CREATE TABLE spill (x)")
for _ in range(20000):
    con.execute("INSERT INTO spill VALUES (?)", ("x" * 100,))
os._exit(0)  # as SIGKILL: no rollback, no close
"""


def test_a_study_a_killed_process_left_mid_write_is_rolled_back_not_refused(tmp_path):
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    optuna.create_study(study_name="s", storage=url).enqueue_trial({"x": 1})
    subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(db)], check=True)
    assert (tmp_path / "optuna.db-journal").exists()  # a hot journal
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as con:
        try:
            con.execute("PRAGMA quick_check").fetchall()
            raise AssertionError("a read-only connection read a database with a hot journal")
        except sqlite3.OperationalError as err:
            assert "readonly" in str(err)
    check_study(tmp_path, SimpleNamespace(optuna_storage=url, study_name="s"), progressed=True)
    study = optuna.load_study(study_name="s", storage=url)
    assert len(study.trials) == 1  # the last committed state
    with sqlite3.connect(db) as con:
        assert not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'spill'").fetchall()
