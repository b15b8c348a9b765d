"""Where a search writes, checked before anything is written: ``storage_dir`` can be a folder, a
database URL (``optuna_storage``, ``mlflow.tracking_uri``) names a database driver that is
installed and, for SQLite and journal files, a folder that exists, and a tracking server
answers."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from search.config import ExperimentConfig
from search.overrides import SearchConfigError
from search.redact import redact

#: database driver modules (as SQLAlchemy imports them) -> the pip package that provides them
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pg8000": "pg8000",
    "asyncpg": "asyncpg",
    "pymysql": "PyMySQL",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "mariadb": "mariadb",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
    "oracledb": "oracledb",
    "cx_Oracle": "cx_Oracle",
}
#: tracking URI schemes that are not databases
NOT_DATABASES = ("http://", "https://", "file:", "databricks", "uc:", "mlflow-artifacts:")
ANSWER_TIMEOUT_S = 5.0


def check_endpoints(exp: ExperimentConfig, source: str) -> None:
    """The storage folder and the database URLs of ``exp`` (nothing is contacted)."""
    check_storage_dir(exp, source)
    if exp.optuna_storage:
        check_database_url(exp.optuna_storage, "optuna_storage", source)
    uri = exp.mlflow.tracking_uri
    if uri and not uri.startswith(NOT_DATABASES) and "://" in uri:
        check_database_url(uri, "mlflow.tracking_uri", source, sqlite_folder=False)


def check_storage_dir(exp: ExperimentConfig, source: str) -> None:
    """``storage_dir`` and the search folder must be folders, or not exist yet."""
    folder = exp.experiment_dir
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise SearchConfigError(
                    f"{source}: storage_dir = {exp.storage_dir!r}: {path} is a file, not a "
                    "folder; give a folder (it is created if missing)"
                )
            return


def check_database_url(url: str, field: str, source: str, sqlite_folder: bool = True) -> None:
    """An RDB URL's dialect is known and its driver installed (else: the package to install);
    a SQLite or journal file's folder exists."""
    shown = redact(url)
    if url.startswith("journal://"):
        _check_folder(Path(url.removeprefix("journal://")), field, shown, source)
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    from sqlalchemy.exc import NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise SearchConfigError(
            f"{source}: {field} = {shown}: not a database URL SQLAlchemy knows ({err}); write "
            "it as dialect+driver://user@host/db, sqlite:////abs/path.db or journal:///path.log"
        ) from err
    try:
        dialect.import_dbapi()
    except ImportError as err:
        module = (err.name or "").split(".")[0]
        package = DRIVER_PACKAGES.get(module, module or "its driver")
        raise SearchConfigError(
            f"{source}: {field} = {shown}: the database driver {module or '?'} is not "
            f"installed; `pip install {package}` in this environment (and on every node that "
            "runs the driver), or name another driver in the URL (dialect+driver://...)"
        ) from err
    if sqlite_folder and parsed.get_backend_name() == "sqlite" and parsed.database:
        _check_folder(Path(parsed.database), field, shown, source)


def _check_folder(path: Path, field: str, shown: str, source: str) -> None:
    parent = path.expanduser().parent
    if not parent.is_dir():
        raise SearchConfigError(
            f"{source}: {field} = {shown}: the folder {parent} does not exist; create it or "
            "point the URL at a file in an existing folder"
        )


def check_tracking_server(uri: str, then: str) -> None:
    """An http(s) tracking URI must answer (MLflow itself would retry for minutes before
    failing). ``then``: what to do once it answers."""
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]  # credentials, if any, are MLflow's business
    path = parts.path.rstrip("/") + "/health"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
    try:
        urllib.request.urlopen(url, timeout=ANSWER_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answers (perhaps asking for credentials): MLflow handles that
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise SearchConfigError(
            f"no MLflow tracking server answers at {redact(uri)} ({reason}); start it "
            "(`mlflow server --host 127.0.0.1 --port PORT --backend-store-uri "
            f"sqlite:///mlflow.db`) or set mlflow.tracking_uri, then {then}"
        ) from err
