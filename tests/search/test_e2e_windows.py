"""What a person sees of a search, looked at in a real headless browser (Debian's chromium,
driven by Playwright): a tiny search submitted as a Ray job exactly as docs/tracking.md says
(`ray job submit ... -- python -m search launch X.yaml`) to a real `ray start` cluster with its
dashboard, tracked by a real `mlflow server`.

- MLflow: the link the search prints opens the front's runs, not collapsed under their parent,
  with their accuracy and MACs, sorted by MACs; the parent run's description is the front,
  each trial linked to its run and each model to its registered version.
- Ray dashboard: after the token login, the Jobs page lists the job under the search's name,
  succeeded, and its driver log holds the progress lines; the Actors page names each trial.

One search, one cluster, one tracking server and one browser serve every assertion.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

from tests.helpers import REPO
from tests.search.helpers import NO_SERVER_JOBS
from tests.search.helpers import server_command

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("windows")]  # one search serves all
NAME = "webwatch"  # the search, its Ray job and its MLflow experiment
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    """Debian's chromium; without it (or Playwright) the test skips, except in CI."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = 'Playwright is not installed (pip install -c constraints.txt -e ".[test]")'
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = reason or "no chromium on PATH (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must look at the pages: {reason}")
        pytest.skip(reason)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, ok: tuple[int, ...], what: str, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            code = urllib.request.urlopen(url, timeout=2).status
        except urllib.error.HTTPError as err:
            code = err.code
        except OSError:
            code = None
        if code in ok:
            return
        time.sleep(1)
    raise AssertionError(f"{what} did not come up: {log.read_text()[-3000:]}")


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def _stop(proc: subprocess.Popen, first: int) -> None:
    """Stop a server and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, first)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def windows(empty_store: Path) -> Iterator[dict[str, Any]]:
    """A `ray start` head with its dashboard and token login, a `mlflow server`, and a search of
    one sampled trial and the dense reference (1 epoch) submitted with `ray job submit`."""
    chromium = _chromium()
    # Short (Ray's socket paths must fit 107 bytes) and Ray's own: `ray start` records its
    # address in <temp-dir>/ray_current_cluster, where no other process on the machine reads.
    root = Path(tempfile.mkdtemp(prefix="windows", dir="/tmp"))
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PYTHONPATH=str(REPO))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    dash, mport = _free_port(), _free_port()
    ray = _start(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--dashboard-agent-listen-port", str(_free_port()), "--num-cpus", "2",
         "--temp-dir", str(root / "ray"), "--disable-usage-stats"],
        root / "ray.log", env, root,
    )  # fmt: skip
    shutil.copyfile(empty_store, root / "mlflow.db")
    server = _start(
        server_command(mport, root / "mlflow.db", root / "artifacts"),
        root / "mlflow.log", {**env, **NO_SERVER_JOBS}, root,
    )  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", (200, 401), "Ray", root / "ray.log")
        _wait_http(f"http://127.0.0.1:{mport}/health", (200,), "MLflow", root / "mlflow.log")
        uri = f"http://127.0.0.1:{mport}"
        started = time.time()
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}",
             "--working-dir", str(REPO), "--metadata-json", json.dumps({"job_name": NAME}),
             "--", sys.executable, "-m", "search", "launch", "experiments/smoke.yaml",
             "--set", f"name={NAME}", "--set", f"storage_dir={root / 'runs'}",
             "--set", f"mlflow.tracking_uri={uri}", "--set", "num_trials=1",
             "--set", "trial.epochs=1", "--set", "references={dense: true}"],
            capture_output=True, text=True, timeout=600, env=env, cwd=root,
        )  # fmt: skip
        print(f"the search as a Ray job took {time.time() - started:.0f} s")
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        yield {
            "chromium": chromium,
            "dashboard": f"http://127.0.0.1:{dash}",
            "token": token,
            "uri": uri,
            "log": job.stdout,
            "root": root,
        }
    finally:
        _stop(server, signal.SIGTERM)
        _stop(ray, signal.SIGINT)  # `ray start --block` shuts its node down on Ctrl-C
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(windows: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=windows["chromium"], args=CHROMIUM_ARGS)
        yield b  # a fresh profile (user data dir) per context
        b.close()


def _page(browser: Any) -> Any:
    page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    return page


def _front(uri: str) -> tuple[Any, list[Any]]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(NAME)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dgc_search.kind` = 'search'")
    front = client.search_runs(
        [exp.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.pareto = 'true'",
    )
    assert front, "a search always has a front"
    return parent, sorted(front, key=lambda r: r.data.metrics["macs"])


def _shown(value: float) -> str:
    """A metric as the MLflow UI's runs table writes it (JavaScript's number to string)."""
    return str(int(value)) if value == int(value) else repr(value)


#: the MLflow runs table's rows, top to bottom, as {column id: the text shown}
ROWS_JS = """() => {
  const rows = {};
  for (const cell of document.querySelectorAll('.ag-row [col-id]')) {
    const row = cell.closest('[row-index]').getAttribute('row-index');
    (rows[row] ??= {})[cell.getAttribute('col-id')] = cell.innerText.trim();
  }
  return Object.keys(rows).sort((a, b) => a - b).map((k) => rows[k]);
}"""


def test_the_printed_mlflow_link_opens_the_front_sorted_by_macs(windows, browser):
    match = re.search(r"MLflow runs on the front: (http://\S+)", windows["log"])
    assert match, windows["log"][-3000:]
    _, front = _front(windows["uri"])
    page = _page(browser)
    page.goto(match.group(1))
    page.get_by_text(f"{len(front)} matching runs").wait_for()
    page.get_by_text(front[-1].info.run_name, exact=True).first.wait_for()
    page.wait_for_timeout(1000)  # the cells fill in after the runs arrive
    page.screenshot(path=str(windows["root"] / "mlflow.png"))
    rows = page.evaluate(ROWS_JS)
    # The runs of the front, flat (no parent row to expand) and in the order of their MACs ...
    names = [r["attributes.`Run Name`"].split("\n")[-1] for r in rows]  # after its colour
    assert names == [f.info.run_name for f in front], rows
    # ... with accuracy, MACs and parameters as columns, each run's values in them.
    for row, run in zip(rows, front):
        for metric in ("val_accuracy", "macs", "params"):
            assert row[f"metrics.`{metric}`"] == _shown(run.data.metrics[metric]), (metric, row)


def test_the_parent_run_description_is_the_front_with_links(windows, browser):
    parent, front = _front(windows["uri"])
    exp_id = parent.info.experiment_id
    page = _page(browser)
    page.goto(f"{windows['uri']}/#/experiments/{exp_id}/runs/{parent.info.run_id}")
    page.get_by_text(f"{NAME}: {len(front)} of", exact=False).first.wait_for()
    if page.get_by_text("Show more").count():
        page.get_by_text("Show more").first.click()
    for run in front:
        link = page.locator(f"a[href='#/experiments/{exp_id}/runs/{run.info.run_id}']")
        assert link.first.inner_text() == run.info.run_name
        version = run.data.tags["registered_version"]
        model = page.locator(f"a[href='#/models/{NAME}/versions/{version}']")
        assert model.first.inner_text() == f"models:/{NAME}@{run.data.tags['registered_alias']}"


def _ray_page(browser: Any, windows: dict[str, Any], route: str) -> Any:
    """A page of the Ray dashboard, through its token login as a person goes through it."""
    page = _page(browser)
    page.goto(f"{windows['dashboard']}/#/{route}")
    page.get_by_text("Authentication Token Required").wait_for()
    page.get_by_role("textbox", name="Authentication Token").fill(windows["token"])
    page.keyboard.press("Enter")
    page.get_by_text("Authentication Token Required").wait_for(state="hidden")
    return page


def test_the_ray_dashboard_lists_the_job_by_the_search_name_with_its_progress(windows, browser):
    page = _ray_page(browser, windows, "jobs")
    row = page.locator("tr", has=page.get_by_text(NAME, exact=True))
    row.get_by_text("SUCCEEDED").wait_for()
    page.screenshot(path=str(windows["root"] / "jobs.png"))
    row.locator("a").first.click()  # the job's page, its DRIVER log
    page.get_by_text("front so far", exact=False).first.wait_for()
    page.get_by_label("Keyword").fill("front so far")  # the log's filter: the progress lines
    page.get_by_text("[2/2]", exact=False).first.wait_for()
    page.screenshot(path=str(windows["root"] / "job.png"))
    log = page.inner_text("body")
    lines = [line for line in log.splitlines() if re.search(r"\[\d/2\] ", line)]
    assert len(lines) == 2, log[-3000:]
    assert all(" done: val_accuracy=" in line and "front so far" in line for line in lines)
    assert any("ref-dense (" in line for line in lines), lines


def test_the_ray_dashboard_names_each_trial_actor(windows, browser):
    page = _ray_page(browser, windows, "actors")
    page.get_by_text("SearchTrial").first.wait_for()
    text = page.inner_text("body")
    assert re.search(r"ref-dense \([0-9a-f]{8}\)", text), text[-3000:]
    assert re.search(r"trial-0 \([0-9a-f]{8}\)", text), text[-3000:]
