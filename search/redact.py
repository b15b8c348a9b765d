"""Credentials out of what the product writes or prints: URLs in logs and MLflow artifacts.

A storage or tracking URL may carry a password (``postgresql://user:pw@host/db``) or a token in
its query string. The files in the search folder keep them (resume reconnects with them; they
are the user's own files); copies sent to MLflow and every log line get ``***`` instead.
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
