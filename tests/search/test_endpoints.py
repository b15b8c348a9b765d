"""Storage folders, database drivers and tracking servers, checked before anything is
written."""

from __future__ import annotations

import socket

import pytest

from search.config import load_experiment
from search.endpoints import check_database_url
from search.endpoints import check_endpoints
from search.endpoints import check_tracking_server
from search.overrides import SearchConfigError
from tests.helpers import REPO

SMOKE = REPO / "experiments" / "smoke.yaml"


def test_storage_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x\n")
    exp = load_experiment(SMOKE, [f"storage_dir={tmp_path / 'f'}"])
    with pytest.raises(SearchConfigError, match=r"storage_dir = .*f is a file, not a folder"):
        check_endpoints(exp, "exp.yaml")


@pytest.mark.parametrize(
    "url,message",
    [
        ("mysql+pymysql://u:secret@h/db", "driver pymysql is not installed; `pip install PyMySQL`"),
        ("nosuchdb://h/db", "not a database URL SQLAlchemy knows"),
        ("sqlite:////nonexistent/dir/o.db", "the folder /nonexistent/dir does not exist"),
        ("journal:///nonexistent/dir/o.log", "the folder /nonexistent/dir does not exist"),
    ],
)
def test_database_urls_are_checked_without_a_connection(url, message):
    with pytest.raises(SearchConfigError, match="optuna_storage") as err:
        check_database_url(url, "optuna_storage", "exp.yaml")
    assert message in str(err.value) and "secret" not in str(err.value)


def test_a_tracking_server_that_does_not_answer_is_named_at_once():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        SearchConfigError,
        match=f"no MLflow tracking server answers at "
        f"http://u:\\*\\*\\*@127.0.0.1:{port}.*then resume",
    ):
        check_tracking_server(f"http://u:pw@127.0.0.1:{port}", "resume")  # fmt: skip
