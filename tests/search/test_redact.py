"""Credentials in URLs never reach MLflow artifacts, log lines or error messages."""

from __future__ import annotations

import mlflow
import pytest

from search.redact import RedactingFilter
from search.redact import log_redacted_artifact
from search.redact import redact
from tests.helpers import logged_through


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "postgresql://user:s3cret@db.example:5432/optuna",
            "postgresql://user:***@db.example:5432/optuna",
        ),
        ("mysql+pymysql://u:p%40ss@h/db?charset=utf8", "mysql+pymysql://u:***@h/db?charset=utf8"),
        ("http://alice:pw@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
        ("storage: 'redis://:tok@h:6379/0'", "storage: 'redis://:***@h:6379/0'"),
        ("https://h/api?token=abc123&x=1", "https://h/api?token=***&x=1"),
        ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
        ("http://user@127.0.0.1:5000", "http://user@127.0.0.1:5000"),  # no password
    ],
)
def test_redact_urls(text, expected):
    assert redact(text) == expected


def test_artifact_sent_to_mlflow_is_redacted_and_local_file_kept(tmp_path, mlflow_db):
    client = mlflow.MlflowClient(mlflow_db)
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    src = tmp_path / "exp.yaml"
    src.write_text("optuna_storage: postgresql://user:s3cret@db/optuna\n")
    log_redacted_artifact(client, run.info.run_id, src)
    logged = client.download_artifacts(run.info.run_id, "exp.yaml", str(tmp_path / "dl"))
    text = open(logged).read()
    assert "s3cret" not in text and "postgresql://user:***@db/optuna" in text
    assert "s3cret" in src.read_text()  # resume needs the real URL from the user's own file


def test_log_lines_are_redacted():
    with logged_through(RedactingFilter()) as (logger, stream):
        logger.warning("cannot reach %s", "postgresql://user:s3cret@db/optuna")
    assert stream.getvalue().strip() == "cannot reach postgresql://user:***@db/optuna"
