from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import python


@pytest.fixture(scope="package", autouse=True)
def untimed_kernels():
    """Every search these tests start (its driver, its local cluster, its trials) takes each
    shape's default DGC kernel untimed (``DGC_KERNEL_TIMING=0``): timing the candidates adds
    about a third to a digits trial of a few epochs (docs/benchmarks.md 6.8). The timing is
    tested in tests/dgc."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DGC_KERNEL_TIMING", "0")
        yield


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder: what a search makes relative to the working folder
    (MLflow's default artifact root ./mlruns, next to a SQLite store it creates) lands there,
    not in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, made by MLflow once per test process (in a process of its
    own, so no engine of this one holds it open). A new store runs MLflow's sixty-odd schema
    migrations, about 2 s of CPU in every test that made its own. Made in its own folder: its
    Default experiment keeps its artifacts in ./mlruns of the folder the store was made in."""
    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    made = f"import mlflow; mlflow.MlflowClient('sqlite:///{path}').search_experiments()"
    done = python(made, cwd=path.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return path


@pytest.fixture
def mlflow_db(tmp_path: Path, empty_store: Path) -> str:
    """The URI of ``tmp_path/mlflow.db``, a fresh copy of ``empty_store``: the store a search
    whose working folder is ``tmp_path`` uses by default, already made."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
