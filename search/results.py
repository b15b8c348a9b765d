"""The end of a search: Pareto tags, logged and registered models, the plot and the table."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch

from dgc.program import ShippedModel
from search import names as N
from search.hypervolume import HYPERVOLUME_BY_EPOCHS
from search.logged_model import log_model
from search.mlflow_ui import publish_front
from search.pareto import pareto_ranks
from search.plots import fmt_metric
from search.plots import fmt_setting
from search.plots import heading
from search.plots import write_plots
from search.tracking import Tracking
from search.tracking import tracking_uri
from trainables import metrics as M
from trainables.config import TrialConfig
from trainables.runner import STATE_FILE
from trainables.runner import build_model
from trainables.runner import load_state

log = logging.getLogger(__name__)

#: how a trial config's unset (None) or empty setting is logged as an MLflow parameter
UNSET = ("None", "null", "", "{}", "[]")


@dataclass
class Point:
    run_id: str
    name: str
    values: tuple[float, ...]
    metrics: dict[str, float]
    params: dict[str, str]
    rank: int = 0
    model_uri: str = ""
    stopped: int | None = None  # the epoch an early-stopping scheduler stopped it at
    alias: str = ""  # its registry alias, once registered
    version: str = ""  # its registered model version, once registered
    reference: str = ""  # the label of a reference trial ("dense", "group-0.25")


def finished_points(tracking: Tracking, objectives: list[tuple[str, str]]) -> list[Point]:
    """Finished child runs that report every objective."""
    points = []
    for run in tracking.children():
        m = run.data.metrics
        if run.info.status != "FINISHED" or any(k not in m for k, _ in objectives):
            continue
        if N.PRETRAIN_TAG in run.data.tags:  # the search's starting point, not a candidate
            continue
        points.append(
            Point(
                run.info.run_id,
                run.info.run_name,
                tuple(m[k] for k, _ in objectives),
                dict(m),
                dict(run.data.params),
                model_uri=run.data.tags.get(N.MODEL_URI_TAG, ""),
                stopped=_int_or_none(run.data.tags.get(N.STOPPED_TAG)),
                alias=run.data.tags.get(N.REGISTERED_ALIAS_TAG, ""),
                version=run.data.tags.get(N.REGISTERED_VERSION_TAG, ""),
                reference=run.data.tags.get(N.REFERENCE_TAG, ""),
            )
        )
    return points


def _int_or_none(v: str | None) -> int | None:
    return int(v) if v is not None and v.isdigit() else None


def tag_pareto(tracking: Tracking, points: list[Point], objectives: list[tuple[str, str]]) -> None:
    """Rank the trials that ran to their last epoch; early-stopped ones are never on a front."""
    for p in points:
        if p.stopped is not None:
            tracking.client.set_tag(p.run_id, N.PARETO_TAG, "false")
    ranked = [p for p in points if p.stopped is None]
    ranks = pareto_ranks([p.values for p in ranked], [d for _, d in objectives])
    for p, rank in zip(ranked, ranks):
        p.rank = rank
        tracking.client.set_tag(p.run_id, N.PARETO_TAG, "true" if rank == 1 else "false")
        tracking.client.set_tag(p.run_id, N.PARETO_RANK_TAG, str(rank))


def log_and_register(
    tracking: Tracking,
    front: list[Point],
    registered_name: str,
    num_classes: int,
    input_size: tuple[int, int, int],
) -> None:
    """Log each front model as an MLflow LoggedModel (signature + input example), register it
    under ``registered_name`` and alias it by MACs; already-logged runs are skipped."""
    client = tracking.client
    for p in sorted(front, key=lambda p: p.metrics.get(M.MACS, 0)):
        if not p.model_uri:
            p.model_uri = _log_model(tracking, p, num_classes, input_size)
        if N.REGISTERED_VERSION_TAG in client.get_run(p.run_id).data.tags:
            continue  # registered by an earlier run of pareto (p.alias read from its tag)
        with tracking_uri(tracking.uri):
            version = mlflow.register_model(p.model_uri, registered_name).version
        alias = _alias(p)
        client.set_registered_model_alias(registered_name, alias, version)
        _describe_version(tracking, registered_name, version, p)
        p.alias, p.version = alias, str(version)
        client.set_tag(p.run_id, N.REGISTERED_VERSION_TAG, str(version))
        client.set_tag(p.run_id, N.REGISTERED_ALIAS_TAG, alias)
        log.info("registered %s version %s as @%s (%s)", registered_name, version, alias, p.name)


def _describe_version(tracking: Tracking, name: str, version: str, p: Point) -> None:
    """Accuracy, cost and settings on the registered version itself, so the registry page alone
    tells the versions apart."""
    keys = (M.VAL_ACCURACY, M.MACS, M.PARAMS, M.LATENCY_MS)
    shown = {k: p.metrics[k] for k in keys if k in p.metrics}
    settings = {
        k: fmt_setting(v)
        for k, v in p.params.items()
        if k.startswith("model.") and v not in UNSET  # a DGC setting a dense network lacks
    }
    for key, value in {**{k: f"{v:.6g}" for k, v in shown.items()}, **settings}.items():
        tracking.client.set_model_version_tag(name, version, key, value[:5000])
    text = ", ".join(fmt_metric(k, v) + f" {k}" for k, v in shown.items())
    tracking.client.update_model_version(
        name,
        version,
        description=f"{p.name} (run {p.run_id}): {text}; "
        + ", ".join(f"{k}={v}" for k, v in settings.items())
        + f". Load: `mlflow.pyfunc.load_model('models:/{name}/{version}')` as it is, or "
        f"`import dgc` (its operator), then `mlflow.pytorch.load_model('models:/{name}/"
        f"{version}')`.",
    )


def _alias(p: Point) -> str:
    """``macs-0p414m-1a2b3c4d``: the MACs to read, and the run id's first 8 characters so that
    two points of nearly equal MACs (or two searches of one name) never share an alias and
    an alias never moves to another version."""
    macs = p.metrics.get(M.MACS, 0)
    return re.sub(r"[^\w-]", "_", f"macs-{macs / 1e6:.3g}m-{p.run_id[:8]}".replace(".", "p"))


def _log_model(
    tracking: Tracking, p: Point, num_classes: int, input_size: tuple[int, int, int]
) -> str:
    client = tracking.client
    run = client.get_run(p.run_id)
    checkpoint = run.data.tags.get(N.CHECKPOINT_TAG)
    if not checkpoint:
        raise RuntimeError(f"run {p.run_id} has no checkpoint tag; cannot log its model")
    config_path = client.download_artifacts(p.run_id, "trial_config.json")
    cfg = TrialConfig.model_validate(json.loads(Path(config_path).read_text()))
    model = build_model(cfg, num_classes, input_size[0])
    model.load_state_dict(load_state(Path(checkpoint) / STATE_FILE)["model"])
    model.eval()
    meta = _model_meta(cfg, num_classes, input_size)
    # Batch 2: a batch of 1 would let torch.export (MLflow's pt2 format) specialise it to 1.
    example = np.random.default_rng(0).standard_normal((2, *input_size)).astype(np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    kwargs = {"num_classes": num_classes, "in_chans": input_size[0], **meta["kwargs"]}
    # The eval model as one dgc operator: the loaded program runs the eager model's forward
    shipped = ShippedModel(model, meta["name"], kwargs, torch.from_numpy(example))
    with tracking_uri(tracking.uri), mlflow.start_run(run_id=p.run_id):
        info = log_model(shipped, signature, example)  # with dgc in its code/ folder
    _log_weights(tracking, p.run_id, model, meta)
    client.set_tag(p.run_id, N.MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def _model_meta(cfg: TrialConfig, num_classes: int, input_size: tuple[int, int, int]) -> dict:
    return {
        "name": cfg.model.name,
        "num_classes": num_classes,
        "in_chans": input_size[0],
        "kwargs": {k: v for k, v in cfg.model.arch_kwargs().items() if v is not None},
        "input_size": list(input_size),
    }


def _log_weights(tracking: Tracking, run_id: str, model: torch.nn.Module, meta: dict) -> None:
    """The plain contract next to the MLflow model: ``dgc.create_model(name, **kwargs)`` then
    ``load_state_dict(torch.load("weights.pt", weights_only=True))``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "weights.pt")
        (Path(tmp) / "model_meta.json").write_text(json.dumps(meta, indent=2))
        tracking.client.log_artifacts(run_id, tmp, "dgc")


def table(
    points: list[Point],
    objectives: list[tuple[str, str]],
    space_keys: list[str],
    registered_name: str | None,
    experiment_id: str | None = None,
) -> str:
    """The front as markdown, narrow enough for a terminal: objectives in readable units, the
    sampled settings rounded, and how to load each model (``models:/<name>@<alias>``). The test
    accuracy stays in MLflow: selecting on it would make it a second validation set.

    With ``experiment_id``, for the MLflow UI: each trial links to its run, each model URI to
    its registered version (routes relative to the UI's page)."""
    front = sorted((p for p in points if p.rank == 1), key=lambda p: p.metrics.get(M.MACS, 0))
    metrics = [m for m, _ in objectives] + ([M.PARAMS] if M.PARAMS not in dict(objectives) else [])
    heads = ["trial", *metrics, *(k.removeprefix("model.") for k in space_keys), "load with"]
    rows = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for p in front:
        where = f"`models:/{registered_name}@{p.alias}`" if registered_name and p.alias else "-"
        name = p.name
        if experiment_id is not None:
            name = f"[{p.name}](#/experiments/{experiment_id}/runs/{p.run_id})"
            if where != "-" and p.version:
                where = f"[{where}](#/models/{registered_name}/versions/{p.version})"
        cells = [
            name,
            *[fmt_metric(m, p.metrics.get(m)) for m in metrics],
            *[fmt_setting(p.params.get(k, "")) for k in space_keys],
            where,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def hypervolume_progress(tracking: Tracking) -> list[tuple[int, float]]:
    """(epochs spent, hypervolume) after each trial that ended, as the parent run logged it
    (the last value at each step: a resumed search may log a step again)."""
    if tracking.parent_run_id is None:
        return []
    history = tracking.client.get_metric_history(tracking.parent_run_id, HYPERVOLUME_BY_EPOCHS)
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    return sorted(latest.items())


def finalize(
    tracking: Tracking,
    objectives: list[tuple[str, str]],
    space_keys: list[str],
    out: Path,
    registered_name: str | None,
    num_classes: int,
    input_size: tuple[int, int, int],
) -> str:
    """Tag, (register), plot and tabulate; returns the markdown table (also logged)."""
    points = finished_points(tracking, objectives)
    if not points:
        return "no finished trial reported every objective; nothing to rank"
    tag_pareto(tracking, points, objectives)
    if registered_name:
        log_and_register(
            tracking, [p for p in points if p.rank == 1], registered_name, num_classes, input_size
        )
    out.mkdir(parents=True, exist_ok=True)
    name = registered_name or tracking.experiment_name
    title = heading(points, name)
    text = title + "\n\n" + table(points, objectives, space_keys, registered_name)
    (out / "pareto.md").write_text(text + "\n")
    progress = hypervolume_progress(tracking)
    plots = write_plots(points, objectives, space_keys, out, title, progress)
    files = [out / "pareto.md", *plots]
    for f in files:
        tracking.client.log_artifact(tracking.parent_run_id, str(f))
    linked = table(points, objectives, space_keys, registered_name, tracking.experiment_id)
    publish_front(tracking, name, title, linked, [m for m, _ in objectives], space_keys)
    return text
