"""Faults a long search meets, each through the CLI as a user types it (``python -m search``
from a temporary folder), on real Ray, real MLflow stores (a real ``mlflow server`` where the
fault is about one) and real files: Ctrl-C, SIGTERM and SIGKILL then ``resume``; two launches at
once; a tracking server that goes away; a full disk; damaged state; an edited experiment; a
logged model loaded without ``import dgc``; bad files; credentials in URLs (issue #27).

Most searches join one shared two-CPU cluster (``--address``) to save a cluster start each;
the first and the concurrent launches start their own local clusters, as users do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from search.state import SearchState
from search.tracking import tracking_uri
from search.tune_runs import all_records
from tests.helpers import REPO
from tests.helpers import logged_through
from tests.helpers import python
from tests.search.helpers import children
from tests.search.helpers import server_command
from tests.search.helpers import server_env

SMOKE = REPO / "experiments" / "smoke.yaml"
E2E = pytest.mark.e2e
FINISHED = pytest.mark.xdist_group("finished")  # the tests of one finished search: one worker
TINY = ["--set", "mlflow.register_models=false", "--set", "trial.epochs=2"]


def cli(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "search", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def start(*args: str, cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A CLI command in its own process group (SIGKILL takes its local cluster along)."""
    return subprocess.Popen(
        [sys.executable, "-m", "search", *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never came (rc={proc.poll()}):\n{log.read_text()[-3000:]}")


def wait_for_metric(db: Path, key: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until some run in the SQLite store ``db`` has logged ``key`` (read-only, polled)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as c:
                if c.execute("SELECT 1 FROM metrics WHERE key = ? LIMIT 1", (key,)).fetchone():
                    return
        except sqlite3.OperationalError:  # locked by a write: ask again
            pass
        time.sleep(0.1)
    raise AssertionError(f"no run logged {key!r} (rc={proc.poll()})")


def ended(proc: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return rc, log.read_text(errors="replace")


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-4000:]


def study_of(folder: Path, suffix: str = "") -> optuna.Study:
    state = SearchState.load(folder)
    return optuna.load_study(study_name=state.study_name + suffix, storage=state.optuna_storage)


def states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A real two-CPU Ray cluster that the searches of this module join with --address."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield c.address
    c.shutdown()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can stop and start again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            server_command(self.port, self.folder / "server.db", self.folder / "artifacts"),
            stdout=open(self.folder / "server.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=server_env(),
        )  # fmt: skip
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(1)
        raise AssertionError((self.folder / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_store):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    shutil.copyfile(empty_store, s.folder / "server.db")
    s.start()
    yield s
    s.stop()


# 1. Ctrl-C, SIGKILL, SIGTERM, then resume ---------------------------------------------------


@E2E
def test_ctrl_c_kill_and_sigterm_lose_nothing_and_resume_completes_exactly(
    tmp_path, cluster, mlflow_db
):
    # 4 epochs: a trial that has reported its first is still training when Ctrl-C comes.
    sets = ["--set", "num_trials=4", "--set", "references={dense: true}", *TINY]
    sets += ["--set", "trial.epochs=4"]
    folder = tmp_path / "runs" / "smoke"
    uri = mlflow_db
    # Ctrl-C on the local cluster a launch starts (the user's default), while a trial trains.
    log = tmp_path / "launch.log"
    proc = start("launch", str(SMOKE), *sets, cwd=tmp_path, log=log)
    wait_for_metric(tmp_path / "mlflow.db", "val_accuracy", proc)
    proc.send_signal(signal.SIGINT)
    rc, out = ended(proc, log)
    assert rc == 130, out[-3000:]
    assert f"continue with: python -m search resume {folder}" in out
    assert "Tuner.restore" not in out and "Pareto front" not in out
    no_traceback(out)
    study = study_of(folder)
    assert "FAIL" not in states(study) and states(study).get("RUNNING")
    parent, kids = children(uri, "smoke")
    assert parent.info.status == "KILLED" and all(k.info.status != "RUNNING" for k in kids)
    stopped = [k for k in kids if k.data.tags.get("status") == "interrupted"]
    assert stopped and all(k.info.status == "KILLED" for k in stopped)
    assert not any("stopped_at_epoch" in k.data.tags for k in kids)  # not "stopped early"

    # A hard stop between the study's ask and Tune's next save (a second's window, which the
    # test opens wide by making that suggestion itself, as the searcher does) leaves a point
    # Tune never saw: resume suggests it again.
    tune_ids = {r.trial_id for r in all_records(folder)}
    assert len(tune_ids) < 5, "Tune already has every trial: no room for a lost point"
    lost = _suggest_one_more(folder)
    assert lost["tags"]["optuna_trial"] not in {
        t.number for t in study_of(folder).trials if t.user_attrs.get("ray_trial_id") in tune_ids
    }

    # A driver killed after a trial's new checkpoint replaced its previous one (num_to_keep=1)
    # and before Tune's next save leaves a state that names a checkpoint that is gone.
    paused = next(r for r in all_records(folder) if r.status == "PAUSED" and r.checkpoint)
    named = Path(paused.checkpoint)
    named.rename(named.with_name(f"checkpoint_{int(named.name.split('_')[1]) + 1:06d}"))

    log = tmp_path / "kill.log"
    proc = start("resume", "runs/smoke", "--address", cluster, cwd=tmp_path, log=log)
    wait_for(log, f"names {named.name}, which was replaced by", proc)
    wait_for(log, "was suggested before the stop but never started; suggesting it again", proc)
    wait_for(log, "done:", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # a hard stop of the driver
    proc.wait()

    log = tmp_path / "term.log"
    proc = start("resume", "runs/smoke", "--address", cluster, cwd=tmp_path, log=log)
    wait_for(log, "done:", proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = ended(proc, log)
    assert rc == 143, out[-3000:]
    assert "search stopped (SIGTERM)" in out and "SIGTERM received" not in out
    no_traceback(out)

    done = cli("resume", "runs/smoke", "--address", cluster, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parent, kids = children(uri, "smoke")
    assert parent.info.status == "FINISHED" and len(kids) == 5  # no run twice
    assert all(k.info.status == "FINISHED" for k in kids)
    assert lost["tags"]["optuna_trial"] in {int(k.data.tags.get("optuna_trial", -1)) for k in kids}
    client = mlflow.MlflowClient(uri)
    for k in kids:  # every epoch of every trial recorded
        assert {m.step for m in client.get_metric_history(k.info.run_id, "epoch")} == {1, 2, 3, 4}
    assert states(study_of(folder)) == {"COMPLETE": 4}  # trained means COMPLETE, none lost
    references = study_of(folder, ".references")
    assert states(references) == {"COMPLETE": 1} and len(references.trials) == 1


def _suggest_one_more(folder: Path) -> dict:
    """What the searcher records when Tune asks it for a trial: the point, under a Ray trial
    id that Tune then never saved."""
    from search.preflight import Problem
    from search.searcher import OptunaSearcher
    from search.state import load_search
    from search.study import StudyRef

    exp, state = load_search(folder)
    problem = Problem(state.num_classes, tuple(state.input_size), state.num_stages)
    searcher = OptunaSearcher(exp, problem, StudyRef(state.optuna_storage, state.study_name))
    return searcher.suggest("never-saved")


# 2. Two launches at once --------------------------------------------------------------------


@E2E
def test_two_launches_at_once_make_one_search_and_two_searches_get_two_dashboards(
    tmp_path, mlflow_db
):
    one = ["--set", "num_trials=1", "--set", "trial.epochs=1", "--set",
           "mlflow.register_models=false", "--set", "ray={dashboard: true, num_cpus: 1}",
           "--set", "concurrency=1"]  # fmt: skip
    (tmp_path / "b").mkdir()
    procs = {
        "a1": start("launch", str(SMOKE), *one, cwd=tmp_path, log=tmp_path / "a1.log"),
        "a2": start("launch", str(SMOKE), *one, cwd=tmp_path, log=tmp_path / "a2.log"),
        "b": start("launch", str(SMOKE), *one, "--set", "name=other", cwd=tmp_path / "b",
                   log=tmp_path / "b.log"),
    }  # fmt: skip
    results = {k: ended(p, tmp_path / f"{k}.log") for k, p in procs.items()}
    codes = sorted(results[k][0] for k in ("a1", "a2"))
    assert codes == [0, 2], {k: v[1][-2000:] for k, v in results.items()}
    refused = next(out for rc, out in (results["a1"], results["a2"]) if rc == 2)
    assert "is in use by another command (pid" in refused
    no_traceback(refused)
    assert results["b"][0] == 0, results["b"][1][-3000:]
    parent, kids = children(mlflow_db, "smoke")  # one parent
    assert len(kids) == 1 and [p.name for p in (tmp_path / "runs" / "smoke").glob("tune*")] == [
        "tune"
    ]
    ports = {
        out.split("Ray dashboard: http://127.0.0.1:")[1].split()[0]
        for rc, out in results.values()
        if rc == 0
    }
    assert len(ports) == 2  # two searches, two dashboards


# 3. A tracking server that goes away --------------------------------------------------------


def epochs_done(folder: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.glob("tune*/trial_*/result.json"))


@E2E
def test_a_tracking_server_away_longer_than_mlflows_retries_loses_nothing(
    tmp_path, cluster, server
):
    # MLflow's documented retry settings, shortened so that "longer than its retry budget"
    # (here about 2 s for a refused connection) takes seconds, not minutes.
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # fmt: skip
    sets = ["--set", "num_trials=3", "--set", "trial.epochs=2", "--set",
            "mlflow.register_models=false", "--set", f"mlflow.tracking_uri={server.uri}",
            "--set", "name=outage"]  # fmt: skip
    folder = tmp_path / "runs" / "outage"
    log = tmp_path / "launch.log"
    proc = start("launch", str(SMOKE), *sets, "--address", cluster, cwd=tmp_path, log=log,
                 env=env)  # fmt: skip
    wait_for(log, "[1/3]", proc)
    server.stop()
    down, before = time.time(), epochs_done(folder)
    while time.time() - down < 8 or epochs_done(folder) <= before:  # training goes on
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() - down < 300, "no epoch trained while the server was away"
        time.sleep(1)
    server.start()
    rc, out = ended(proc, log)
    assert rc == 0, out[-3000:]
    assert "does not take writes" in out and "takes writes again" in out
    no_traceback(out)
    parent, kids = children(server.uri, "outage")
    assert parent.info.status == "FINISHED" and len(kids) == 3
    client = mlflow.MlflowClient(server.uri)
    for k in kids:
        assert k.info.status == "FINISHED"
        history = [m.step for m in client.get_metric_history(k.info.run_id, "val_accuracy")]
        assert sorted(history) == [1, 2]  # every epoch, once
    assert states(study_of(folder)) == {"COMPLETE": 3}


# 4. A full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:200]})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    balloon = disk / "balloon"
    with open(balloon, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return balloon


@E2E
def test_a_full_disk_stops_with_one_message_and_resume_completes(
    tmp_path, cluster, small_disk, mlflow_db
):
    sets = ["--set", "num_trials=3", "--set", "trial.epochs=2", "--set",
            "mlflow.register_models=false", "--set", f"storage_dir={small_disk}",
            "--set", "name=full"]  # fmt: skip
    log = tmp_path / "launch.log"
    proc = start("launch", str(SMOKE), *sets, "--address", cluster, cwd=tmp_path, log=log)
    wait_for(log, "[1/3]", proc)
    balloon = fill(small_disk)
    rc, out = ended(proc, log)
    assert rc == 1, out[-3000:]
    assert "the disk is full" in out
    assert f"then continue with: python -m search resume {small_disk / 'full'}" in out
    no_traceback(out)
    assert "FAIL" not in states(study_of(small_disk / "full"))
    balloon.unlink()
    done = cli("resume", str(small_disk / "full"), "--address", cluster, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, kids = children(mlflow_db, "full")
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    assert states(study_of(small_disk / "full")) == {"COMPLETE": 3}


# A finished search for items 5 to 7 --------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cluster):
    """A tiny finished search, launched from the user's own experiment file."""
    root = tmp_path_factory.mktemp("finished")
    doc = yaml.safe_load(SMOKE.read_text())
    doc.update(name="done", num_trials=2, space=str(REPO / "spaces" / "tiny.yaml"))
    doc["trial"]["epochs"] = 1
    (root / "exp.yaml").write_text(yaml.safe_dump(doc))
    out = cli("launch", "exp.yaml", "--address", cluster, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root


DAMAGE = {
    "optuna.db empty": lambda f: (f / "optuna.db").write_bytes(b""),
    "optuna.db deleted": lambda f: (f / "optuna.db").unlink(),
    "optuna.db truncated": lambda f: (f / "optuna.db").write_bytes(
        (f / "optuna.db").read_bytes()[: (f / "optuna.db").stat().st_size // 2]
    ),
    "optuna.db header overwritten": lambda f: _overwrite(f / "optuna.db", b"\xff" * 100),
    "search.json num_classes 'ten'": lambda f: _edit_state(f, num_classes="ten"),
    "optuna_storage in a missing folder": lambda f: _edit_state(
        f, optuna_storage=f"sqlite:///{f / 'gone' / 'optuna.db'}"
    ),
    "Tune state and its last complete copy truncated": lambda f: [
        p.write_text(p.read_text()[:200])
        for p in [
            *(f / "tune").glob("experiment_state-*.json"),
            *(f / "tune" / ".state-backup").glob("experiment_state-*.json"),
        ]
    ],  # fmt: skip
}
NAMED = {
    "optuna.db empty": ("optuna.db: empty (0 bytes)", "Restore it from a backup"),
    "optuna.db deleted": ("optuna.db: missing", "Restore it from a backup"),
    "optuna.db truncated": ("optuna.db: the study's database is damaged", "Restore it"),
    "optuna.db header overwritten": ("optuna.db: the study's database is damaged", "Restore"),
    "search.json num_classes 'ten'": ("search.json: num_classes = 'ten'", "restore it"),
    "optuna_storage in a missing folder": ("gone does not exist", "Restore it"),
    "Tune state and its last complete copy truncated": (
        "Tune's saved state cannot be read",
        "Restore it",
    ),
}


def _overwrite(path: Path, head: bytes) -> None:
    data = path.read_bytes()
    path.write_bytes(head + data[len(head) :])


def _edit_state(folder: Path, **fields: object) -> None:
    doc = json.loads((folder / "search.json").read_text())
    (folder / "search.json").write_text(json.dumps({**doc, **fields}))


# 5. Damaged state ---------------------------------------------------------------------------


@pytest.fixture
def done(tmp_path, finished):
    """The finished search's folder, to damage: put back as it was after the test."""
    folder = finished / "runs" / "done"
    shutil.copytree(folder, tmp_path / "backup")
    yield folder
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "backup", folder)


@FINISHED
@E2E
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_state_is_refused_before_anything_runs(tmp_path, done, damage):
    folder = done
    DAMAGE[damage](folder)
    before = sorted(p.name for p in folder.iterdir())
    db = folder / "optuna.db"
    size = db.stat().st_size if db.exists() else None
    out = cli("resume", str(folder), cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    what, how = NAMED[damage]
    assert what in out.stderr and how in out.stderr, out.stderr
    assert "pareto" in out.stderr or "search.json" in what  # the way to recover
    no_traceback(out.stderr)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing created
    assert (db.stat().st_size if db.exists() else None) == size  # no new study


@FINISHED
@E2E
def test_tune_state_a_full_disk_cut_short_is_put_back_from_its_last_complete_copy(tmp_path, done):
    folder = done
    run = folder / "tune"
    live = max(run.glob("experiment_state-*.json"))  # the one Tune restores from
    whole = live.read_bytes()
    assert (run / ".state-backup" / live.name).read_bytes() == whole  # kept at launch
    live.write_bytes(whole[: len(whole) // 2])  # Tune's in-place copy, cut short
    out = cli("resume", str(folder), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{live} was cut short" in out.stderr and ".damaged" in out.stderr
    assert live.read_bytes() == whole
    assert (run / f"{live.name}.damaged").read_bytes() == whole[: len(whole) // 2]
    no_traceback(out.stderr)


# 7. A logged model without `import dgc` -----------------------------------------------------


LOAD = """
import sys, numpy as np, mlflow
mlflow.set_tracking_uri(sys.argv[1])
x = np.zeros((3, 1, 8, 8), np.float32)
if sys.argv[3] == "pyfunc":
    print("OUT", np.asarray(mlflow.pyfunc.load_model(sys.argv[2]).predict(x)).shape)
else:
    import torch
    if sys.argv[3] == "import":
        import dgc
    print("OUT", tuple(mlflow.pytorch.load_model(sys.argv[2])(torch.from_numpy(x)).shape))
print("DGC", sys.modules["dgc"].__file__)
"""


@FINISHED
@E2E
def test_a_logged_model_declares_dgc_and_loads_without_import_dgc(tmp_path, finished):
    uri = f"sqlite:///{finished / 'mlflow.db'}"
    _, kids = children(uri, "done")
    alias = next(k.data.tags["registered_alias"] for k in kids if "registered_alias" in k.data.tags)
    model = f"models:/done@{alias}"

    def load(how: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LOAD, uri, model, how], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)  # fmt: skip

    pyfunc = load("pyfunc")  # what `mlflow models serve` does: no `import dgc` anywhere
    assert "OUT (3, 10)" in pyfunc.stdout, pyfunc.stderr[-3000:]
    dgc_file = pyfunc.stdout.split("DGC ")[1].strip()
    assert f"{os.sep}code{os.sep}dgc{os.sep}" in dgc_file  # the model's own copy of dgc
    plain = load("pytorch")  # torch meets dgc's operator before any of the model's code
    assert plain.returncode != 0 and "dgc.model_eval" in plain.stdout + plain.stderr
    assert "OUT (3, 10)" in load("import").stdout
    with tracking_uri(uri):  # the registry follows the tracking URI set this way
        local = Path(mlflow.artifacts.download_artifacts(model, dst_path=str(tmp_path / "m")))
    assert (local / "code" / "dgc" / "program.py").is_file()
    assert "torch==" in (local / "requirements.txt").read_text()
    meta = yaml.safe_load((local / "MLmodel").read_text())
    assert meta["flavors"]["python_function"]["loader_module"] == "dgc_pyfunc"
    assert "import dgc" in meta["metadata"]["load"]


# 6. An edited experiment --------------------------------------------------------------------


@FINISHED
@E2E
def test_an_edited_experiment_is_compared_at_resume(tmp_path, finished, cluster):
    experiment, folder = finished / "exp.yaml", finished / "runs" / "done"
    original = yaml.safe_load(experiment.read_text())
    edited = {**original, "space": {"params": {"model.heads": {"type": "categorical",
                                                               "choices": [1, 2]}}}}  # fmt: skip
    experiment.write_text(yaml.safe_dump(edited))
    out = cli("resume", str(folder), "--address", cluster, cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{experiment} was edited since the launch" in out.stderr
    assert "space.params.model.gate_factor" in out.stderr and "resume refuses" in out.stderr
    assert f"python -m search launch {experiment} --set name=done-2" in out.stderr
    no_traceback(out.stderr)
    assert len(children(f"sqlite:///{finished / 'mlflow.db'}", "done")[1]) == 2  # untouched

    experiment.write_text(yaml.safe_dump({**original, "num_trials": 3}))
    more = cli("resume", str(folder), "--address", cluster, cwd=tmp_path)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "resume applies the edits of" in more.stderr and "num_trials: 2 -> 3" in more.stderr
    _, kids = children(f"sqlite:///{finished / 'mlflow.db'}", "done")
    assert len(kids) == 3 and states(study_of(folder)) == {"COMPLETE": 3}  # exactly one more
    assert yaml.safe_load((folder / "experiment.resolved.yaml").read_text())["num_trials"] == 3


# 8. Bad files that validate used to accept --------------------------------------------------


BAD_FILES = {
    "cpu beyond the cluster the file describes": (
        {"resources": {"cpu": 64}, "ray": {"num_cpus": 2}},
        "resources.cpu = 64 per trial, but the local cluster this file starts has 2 "
        "(ray.num_cpus = 2)",
    ),
    "gpu on a local cluster without one": (
        {"resources": {"gpu": 1}},
        "resources.gpu = 1 per trial, but the local cluster this file starts has 0 GPU(s)",
    ),
    "storage_dir a regular file": (
        {"storage_dir": "{tmp}/a-file"},
        "is a file, not a folder; give a folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_validate_and_launch_refuse_the_held_out_bad_files(tmp_path, case):
    import torch

    if "gpu" in case and torch.cuda.device_count():
        pytest.skip("this machine has a GPU: the local cluster would have one")
    changes, message = BAD_FILES[case]
    (tmp_path / "a-file").write_text("not a folder\n")
    doc = {**yaml.safe_load(SMOKE.read_text()), "space": str(REPO / "spaces" / "tiny.yaml")}
    doc.update(json.loads(json.dumps(changes).replace("{tmp}", str(tmp_path))))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    commands = ("validate", "launch") if "storage_dir" in case else ("validate",)
    for command in commands:
        out = cli(command, str(path), cwd=tmp_path, timeout=300)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert str(path) in out.stderr
        no_traceback(out.stderr)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# 9. Credentials -----------------------------------------------------------------------------


def test_a_storage_url_whose_driver_is_missing_is_refused_by_validate(tmp_path):
    url = "postgresql://admin:s3cret@127.0.0.1/optuna"
    out = cli("validate", str(SMOKE), "--set", f"optuna_storage={url}", cwd=tmp_path,
              timeout=300)  # fmt: skip
    assert out.returncode == 2
    assert "optuna_storage = postgresql://admin:***@127.0.0.1/optuna: the database driver" in (
        out.stderr
    )
    assert "is not installed; `pip install " in out.stderr and "no Ray" not in out.stderr
    assert "s3cret" not in out.stdout + out.stderr and "admin:***@" in out.stderr


@E2E
def test_credentials_are_never_written_and_come_back_from_the_users_file(tmp_path, cluster, server):
    secret = "s3cret-pw"
    uri = server.uri.replace("http://", f"http://alice:{secret}@")
    experiment = tmp_path / "exp.yaml"
    doc = yaml.safe_load(SMOKE.read_text())
    doc.update(name="creds", num_trials=1, space=str(REPO / "spaces" / "tiny.yaml"))
    doc["mlflow"] = {"tracking_uri": uri, "register_models": False}
    doc["trial"]["epochs"] = 1
    experiment.write_text(yaml.safe_dump(doc))
    out = cli("launch", str(experiment), "--address", cluster, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    folder = tmp_path / "runs" / "creds"
    written = [p for p in [*folder.rglob("*"), *server.folder.rglob("*")] if p.is_file()]
    assert written and not [p for p in written if secret.encode() in p.read_bytes()]
    assert secret not in out.stdout + out.stderr
    assert SearchState.load(folder).tracking_uri == server.uri.replace("//", "//alice:***@")
    # pareto and resume take the password from the experiment file (or the environment).
    assert cli("pareto", str(folder), "--no-register", cwd=tmp_path).returncode == 0
    experiment.rename(tmp_path / "moved.yaml")
    lost = cli("pareto", str(folder), "--no-register", cwd=tmp_path)
    assert lost.returncode == 2 and "lacks its credential, which is never stored" in lost.stderr
    env = {"MLFLOW_TRACKING_URI": uri}
    assert cli("pareto", str(folder), "--no-register", cwd=tmp_path, env=env).returncode == 0


# 10. One line for a full disk in a log record ----------------------------------------------


def test_a_log_record_of_a_full_disk_loses_its_traceback_and_others_keep_theirs():
    import errno

    from search.faults import FullDiskFilter

    with logged_through(FullDiskFilter()) as (logger, stream):
        for err in (OSError(errno.ENOSPC, "No space left on device"), ValueError("other")):
            try:
                raise RuntimeError("saving failed") from err
            except RuntimeError:
                logger.error(
                    "Saving experiment state to 'x' failed with exception: ", exc_info=True
                )
    full, other = stream.getvalue().split("Saving experiment state")[1:]
    assert full.strip() == (
        "to 'x' failed with exception: the disk is full "
        "(OSError: [Errno 28] No space left on device)"
    )
    assert "Traceback" in other and "ValueError: other" in other


def test_rays_records_pass_the_clis_filters_once_ray_runs(cluster):
    """``ray.init`` clears the "ray" logger's handlers: Tune's full-disk record (and any
    credential in a Ray line) must still reach the CLI's filtered handlers, not Python's
    last-resort one."""
    code = f"""
import errno, logging
from search.__main__ import configure_logging
from search.cluster import connect_ray
from search.config import load_experiment
configure_logging()
connect_ray(load_experiment({str(SMOKE)!r}), {cluster!r})
try:
    raise OSError(errno.ENOSPC, "No space left on device")
except OSError:
    logging.getLogger("ray.tune.execution.experiment_state").error(
        "Saving experiment state to storage at 'sqlite://u:secret@h/x' failed with exception: ",
        exc_info=True)
"""
    out = python(code, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stderr.splitlines() if "Saving experiment state" in x)
    assert line == (
        "Saving experiment state to storage at 'sqlite://u:***@h/x' failed with exception: "
        "the disk is full (OSError: [Errno 28] No space left on device)"
    )
    assert "Traceback" not in out.stderr
