"""The Ray cluster a search runs on: reachability and resource checks before anything is
written, and joining or starting it.

Two searches on one machine each start their own local cluster unless told to share one
(``ray start --head`` once, then ``--address 127.0.0.1:6379`` for both). Local clusters start
one at a time (a machine-wide file lock), each with a free dashboard port: the configured one,
or the next free one when another search holds it.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

import filelock

from search import names as N
from search.config import ExperimentConfig
from search.overrides import SearchConfigError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def check_cluster_reachable(address: str | None) -> None:
    """Fail fast if the cluster at ``address`` (else ``$RAY_ADDRESS``) does not answer:
    ``ray.init`` would wait for minutes. Checked before anything of the search is written."""
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if not address or address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise SearchConfigError(
            f"ray address {address!r} is a dashboard's address (the Job API's); a search "
            "joins a cluster at HOST:PORT of its head node (the --port of `ray start --head`), "
            "or runs as a job: `ray job submit --address "
            f"{address} --working-dir . -- python -m search launch X.yaml` (docs/tracking.md)"
        )
    if address.startswith("ray://"):
        raise SearchConfigError(
            f"ray address {address!r}: Ray Client (ray://) is not supported, since the search's "
            "driver (its study, its tracking queue, Ctrl-C) must run on a node of the cluster; "
            "run the command on the head node with --address HOST:PORT, or submit it as a job "
            "(`ray job submit ... -- python -m search launch X.yaml`, docs/tracking.md)"
        )
    hostport = address.rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise SearchConfigError(
            f"ray address {address!r} has no port; give HOST:PORT of the head node (the "
            "--port of `ray start --head`, 6379 by default)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise SearchConfigError(
            f"no Ray cluster answers at {address} ({err}); start one with `ray start --head "
            f"--port {port}` there, or leave out --address (and ray.address) to run on a "
            "local cluster"
        ) from err


def connect_ray(exp: ExperimentConfig, address: str | None) -> None:
    """Join ``address`` (or the experiment's ``ray.address``, else ``$RAY_ADDRESS``, which
    ``ray job submit`` sets for its driver), or start a local cluster. The driver's Ray job is
    named after the search (the dashboard's Jobs page shows it; a job submitted with
    ``ray job submit`` keeps the name it was submitted with)."""
    import ray

    if ray.is_initialized():
        log.info("using the Ray cluster this process is already connected to")
        return
    target = address or exp.ray.address
    named = ray.job_config.JobConfig(metadata={N.JOB_NAME_KEY: exp.name})
    if target or os.environ.get(RAY_ADDRESS_ENV):  # ray.init reads $RAY_ADDRESS itself
        ctx = ray.init(
            address=target, job_config=named, configure_logging=False, log_to_driver=False
        )
    else:  # "local": a new cluster, not the last one `ray start` left on this machine
        with filelock.FileLock(str(Path(tempfile.gettempdir()) / START_LOCK)):
            port = free_port(exp.ray.dashboard_port) if exp.ray.dashboard else None
            ctx = ray.init(
                address="local",
                num_cpus=exp.ray.num_cpus,
                include_dashboard=exp.ray.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=port or exp.ray.dashboard_port,
                job_config=named,
                configure_logging=False,
                log_to_driver=False,
            )
    # ray.init(configure_logging=False) clears the "ray" logger's handlers and leaves it not
    # propagating: Ray's warnings would reach only Python's last-resort handler, past the
    # filters that redact credentials and shorten a full disk's traceback (search.__main__)
    logging.getLogger("ray").propagate = True
    url = getattr(ctx, "dashboard_url", "") or ""
    if url:
        log.info(
            "Ray dashboard: http://%s (it asks for the token that `ray get-auth-token` "
            "prints; see docs/tracking.md)",
            url.removeprefix("http://"),
        )


#: held while a local cluster starts, so that two searches never pick the same free port
START_LOCK = "dgc-search-ray-start.lock"


def free_port(wanted: int, tries: int = 100) -> int:
    """``wanted`` if nothing listens on it on 127.0.0.1, else the next port that is free."""
    for port in range(wanted, min(wanted + tries, 65536)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port != wanted:
            log.warning(
                "dashboard port %d is taken (another search's dashboard?); this search's "
                "dashboard is on port %d",
                wanted,
                port,
            )
        return port
    return wanted  # Ray's own error names the port


def check_local_fit(exp: ExperimentConfig, source: str, address: str | None = None) -> None:
    """Refuse, without starting anything, a per-trial request larger than the local cluster
    the file describes (``ray.num_cpus``, else this machine's CPUs; this machine's GPUs).
    Joined clusters (also a job's, ``$RAY_ADDRESS``) are checked once joined
    (``check_resources``)."""
    if address or exp.ray.address or os.environ.get(RAY_ADDRESS_ENV):
        return
    r = exp.resources
    cpus = exp.ray.num_cpus or len(os.sched_getaffinity(0))
    where = f"ray.num_cpus = {cpus}" if exp.ray.num_cpus else f"this machine's {cpus} CPUs"
    if r.cpu > cpus:
        raise SearchConfigError(
            f"{source}: resources.cpu = {r.cpu:g} per trial, but the local cluster this file "
            f"starts has {cpus} ({where}); lower resources.cpu, raise ray.num_cpus, or run on "
            "a larger cluster (ray.address, or --address)"
        )
    if r.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if r.gpu > gpus:
            raise SearchConfigError(
                f"{source}: resources.gpu = {r.gpu:g} per trial, but the local cluster this "
                f"file starts has {gpus} GPU(s) (those this machine shows to CUDA); set "
                "resources.gpu: 0, or run on a cluster with GPUs (ray.address, or --address)"
            )


def check_resources(exp: ExperimentConfig) -> None:
    """Refuse a per-trial request that no node of the connected cluster can ever give (Tune
    would leave the trials pending forever, with warnings)."""
    import ray

    need = {"CPU": exp.resources.cpu, "GPU": exp.resources.gpu}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(r.get(k, 0.0) >= v for k, v in need.items() if v > 0) for r in nodes):
        return
    have = "; ".join(f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for r in nodes)
    raise SearchConfigError(
        f"resources: cpu={exp.resources.cpu:g}, gpu={exp.resources.gpu:g} per trial, but no "
        f"node of the cluster has that much (nodes: {have or 'none'}); lower resources.cpu "
        "/ resources.gpu, or join a cluster with such a node (--address)"
    )


def check_job_paths(exp: ExperimentConfig) -> None:
    """Refuse, in a Ray job submitted with a working dir, paths that would land in Ray's
    temporary copy of that folder (the driver's current directory, deleted with the job's
    session): a relative ``storage_dir``, the default ``./mlflow.db``, a relative SQLite
    store. Checked after joining the cluster, before anything of the search is written."""
    import ray

    if not ray.get_runtime_context().runtime_env.get("working_dir"):
        return
    lost = []
    if not Path(exp.storage_dir).expanduser().is_absolute():
        lost.append(f"storage_dir={exp.storage_dir!r}")
    uri = exp.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None or _relative_file_store(uri):
        lost.append(f"mlflow.tracking_uri={uri or './mlflow.db (the default)'}")
    if exp.optuna_storage and _relative_file_store(exp.optuna_storage):
        lost.append(f"optuna_storage={exp.optuna_storage}")
    if lost:
        raise SearchConfigError(
            f"{', '.join(lost)}: this job runs in Ray's temporary copy of its working dir "
            f"({Path.cwd()}), which Ray deletes; give absolute paths or a tracking server, "
            "e.g. `--set storage_dir=$PWD/runs --set mlflow.tracking_uri=sqlite:///$PWD/"
            "mlflow.db` on the `ray job submit` line (docs/tracking.md)"
        )


def _relative_file_store(uri: str) -> bool:
    """A store URI (MLflow's or Optuna's) that names a file by a relative path."""
    for scheme in ("sqlite:///", "journal://", "file://", "file:"):
        if uri.startswith(scheme):
            return not uri.removeprefix(scheme).startswith("/")
    return "://" not in uri and not Path(uri).expanduser().is_absolute()  # a bare path
