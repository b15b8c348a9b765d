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


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, made by MLflow once per test process (in a process of its
    own, so no engine of this one holds it open). A new store runs MLflow's sixty-odd schema
    migrations, about 2 s of CPU in every test that made its own."""
    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    done = python(f"import mlflow; mlflow.MlflowClient('sqlite:///{path}').search_experiments()")
    assert done.returncode == 0, done.stderr[-2000:]
    return path


@pytest.fixture
def mlflow_db(tmp_path: Path, empty_store: Path) -> str:
    """The URI of ``tmp_path/mlflow.db``, a fresh copy of ``empty_store``: the store a search
    whose working folder is ``tmp_path`` uses by default, already made."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
