"""The Ray cluster a search runs on: reachability and resource checks before anything is
written, and joining or starting it."""

from __future__ import annotations

import logging
import socket

from search.config import ExperimentConfig
from search.overrides import SearchConfigError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


def check_cluster_reachable(address: str | None) -> None:
    """Fail fast if the cluster at ``address`` does not answer: ``ray.init`` would wait for
    minutes. Checked before anything of the search is written."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise SearchConfigError(
            f"ray address {address!r} has no port; give HOST:PORT of the head node (the "
            "--port of `ray start --head`, 6379 by default) or ray://HOST:10001"
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
    """Join ``address`` (or the experiment's ``ray.address``), or start a local cluster."""
    import ray

    if ray.is_initialized():
        log.info("using the Ray cluster this process is already connected to")
        return
    target = address or exp.ray.address
    if target:
        ctx = ray.init(address=target, configure_logging=False, log_to_driver=False)
    else:
        ctx = ray.init(
            num_cpus=exp.ray.num_cpus,
            include_dashboard=exp.ray.dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=exp.ray.dashboard_port,
            configure_logging=False,
            log_to_driver=False,
        )
    url = getattr(ctx, "dashboard_url", "") or ""
    if url:
        log.info(
            "Ray dashboard: http://%s (it asks for the token in ~/.ray/auth_token; see "
            "README, 'Watch it run')",
            url.removeprefix("http://"),
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
