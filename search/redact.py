"""Credentials out of what the product writes or prints: URLs in logs and MLflow artifacts.

A storage or tracking URL may carry a password (``postgresql://user:pw@host/db``) or a token in
its query string. Nothing the product writes keeps it: the files of the search folder
(``search.json``, the resolved experiment), the MLflow artifacts and every log line get ``***``
instead. ``resume`` and ``pareto`` take the full URL from the environment (``STORAGE_ENV``,
``TRACKING_ENV``) or from the user's own experiment file, whose redacted form must match.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any

_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s'\"]*):[^@/\s'\"]+@"
)
_QUERY = re.compile(
    r"(?i)(?P<key>[?&;](?:password|passwd|pwd|token|secret|api_key|access_key)=)[^&;#\s'\"]+"
)


def redact(text: str) -> str:
    """``text`` with URL passwords and credential query parameters replaced by ``***``."""
    return _QUERY.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>\g<user>:***@", text))


def log_redacted_artifact(client: Any, run_id: str, path: Path | str) -> None:
    """Log a text file to an MLflow run as a redacted copy under the same name."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(redact(path.read_text(encoding="utf-8")), encoding="utf-8")
        client.log_artifact(run_id, str(copy))


class RedactingFilter(logging.Filter):
    """A handler filter that redacts every record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


#: environment variables that give the full URLs at resume (credentials are never stored)
STORAGE_ENV = "DGC_SEARCH_OPTUNA_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"


def hides_credential(url: str) -> bool:
    """Whether ``url`` is a stored URL whose password or token was replaced by ``***``."""
    return "***" in url and redact(url) == url


def with_credential(stored: str, candidates: list[str | None]) -> str | None:
    """The URL to connect with for a ``stored`` (redacted) one: itself if it hides nothing,
    else the first candidate that redacts to it; None if no candidate does."""
    if not hides_credential(stored):
        return stored
    for url in candidates:
        if url and url != stored and redact(url) == stored:
            return url
    return None
