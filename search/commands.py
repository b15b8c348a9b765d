"""The CLI's commands other than launch: validate, pareto and export."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol
from typing import TypeGuard

import torch

from search import names as N
from search.budget import describe_budget
from search.config import load_experiment
from search.hypervolume import describe_reference
from search.overrides import SearchConfigError
from search.preflight import run_preflight
from search.tracking import default_tracking_uri
from search.tracking import existing_store
from search.tracking import tracking_uri as using_uri

log = logging.getLogger(__name__)


class _ShipsOp(Protocol):
    """A dgc layer that a trace records as one registered operator while ``ship_op``."""

    ship_op: bool


def _ships_op(module: torch.nn.Module) -> TypeGuard[_ShipsOp]:
    return hasattr(module, "ship_op")


def validate_command(path: str, overrides: list[str]) -> int:
    """Validate the file and the space (models built on the meta device); no cluster."""
    exp = load_experiment(path, overrides)
    report = run_preflight(exp, path)
    print(
        f"{path}: OK: {exp.num_trials} trials of {exp.trial.model.name} on "
        f"{exp.trial.data.dataset}, objectives "
        f"{', '.join(f'{o.metric} ({o.direction})' for o in exp.objectives)}"
    )
    print(report.summary(exp.budget.macs))
    print(describe_reference(exp, report))
    for line in describe_budget(exp):
        print(line)
    for note in report.notes:
        print(f"note: {note}")
    return 0


def pareto_command(target: str, register: bool, tracking_uri: str | None = None) -> int:
    """Rank, tag and plot a search given its folder or its MLflow parent run id."""
    from search.conclude import rank
    from search.conclude import replay
    from search.lock import SearchLock
    from search.mlflow_ui import front_link
    from search.state import SearchState
    from search.state import open_search
    from search.tracking_queue import TrackingQueue
    from search.tune_runs import all_records

    folder = Path(target) if Path(target).is_dir() else _folder_of_run(target, tracking_uri)
    folder = folder.resolve()
    SearchState.load(folder)  # a search folder (the lock must not create one)
    with SearchLock(folder, f"run `python -m search pareto {folder}` again"):
        exp, state, tracking = open_search(folder)
        writes = TrackingQueue(tracking, folder).start()  # first what a stopped search kept
        replay(tracking, writes, all_records(folder))
        writes.close()
        text = rank(exp, state, tracking, register, folder)
    print(text)
    print(f"\nplot: {folder / 'pareto.png'} and {folder / 'pareto.html'}")
    print(front_link(tracking.uri, tracking.experiment_id, state.parent_run_id))
    return 0


def _folder_of_run(run_id: str, tracking_uri: str | None) -> Path:
    import mlflow

    client = mlflow.MlflowClient(existing_store(tracking_uri or default_tracking_uri()))
    try:
        folder = client.get_run(run_id).data.tags.get(N.SEARCH_DIR_TAG)
    except mlflow.exceptions.MlflowException as err:
        raise SearchConfigError(
            f"{run_id!r} is neither a folder nor a run of the tracking store "
            f"{client.tracking_uri} ({err}); pass --tracking-uri"
        ) from err
    if not folder:
        raise SearchConfigError(
            f"run {run_id} is not the parent run of a search (no search_dir "
            "tag); give the parent run id or the search folder"
        )
    return Path(folder)


def export_command(source: str, out: str, tracking_uri: str | None) -> int:
    """Write weights (state_dict), the model's create_model call and TorchScript.

    ``source``: a registered model (``models:/<name>@<alias>``), a model URI or a run id.
    """
    import mlflow

    uri = existing_store(tracking_uri or default_tracking_uri())
    client = mlflow.MlflowClient(uri)
    _check_out(Path(out))
    with using_uri(uri):
        try:
            run_id = (
                mlflow.models.get_model_info(source).run_id
                if source.startswith("models:/")
                else source
            )
            meta_path = client.download_artifacts(run_id, "dgc/model_meta.json")
            weights = client.download_artifacts(run_id, "dgc/weights.pt")
        except (OSError, mlflow.exceptions.MlflowException) as err:
            raise SearchConfigError(
                f"{source}: no exported dgc model there ({str(err)[:300]}); give "
                "models:/<name>@<alias> of a registered Pareto model or its run id (only "
                "Pareto models have weights: run `python -m search pareto DIR` first)"
            ) from err
    meta = read_model_meta(Path(meta_path))
    model = build_from_meta(meta, Path(meta_path))
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, OSError) as err:
        raise SearchConfigError(
            f"{weights}: does not fit {meta['name']} ({str(err)[:300]})"
        ) from err
    return write_export(
        model, Path(out), tuple(meta["input_size"]), {**meta, "source": source, "run_id": run_id}
    )


MAX_EXPORT_PARAMS = 10**9


def read_model_meta(path: Path) -> dict:
    """``dgc/model_meta.json`` checked before anything is built: a tampered file must not make
    export allocate tens of GB."""
    import dgc

    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise SearchConfigError(f"{path}: not a JSON model description ({err})") from err
    problems = []
    if not isinstance(meta, dict) or set(meta) != {
        "name",
        "num_classes",
        "in_chans",
        "kwargs",
        "input_size",
    }:
        raise SearchConfigError(
            f"{path}: expected exactly name, num_classes, in_chans, kwargs, input_size"
        )
    if meta["name"] not in dgc.list_models():
        problems.append(f"name={meta['name']!r} is not a registered model")
    if not _int_in(meta["num_classes"], 1, 100_000):
        problems.append(f"num_classes={meta['num_classes']!r} must be an int in [1, 100000]")
    if not _int_in(meta["in_chans"], 1, 64):
        problems.append(f"in_chans={meta['in_chans']!r} must be an int in [1, 64]")
    size = meta["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and all(_int_in(v, 1, 4096) for v in size)):
        problems.append(f"input_size={size!r} must be [channels, height, width], each 1-4096")
    kwargs = meta["kwargs"]
    if not isinstance(kwargs, dict) or not all(_plain(v) for v in kwargs.values()):
        problems.append(f"kwargs={kwargs!r} must map names to numbers or short lists of numbers")
    if problems:
        raise SearchConfigError(f"{path}: " + "; ".join(problems))
    return meta


def create_kwargs(meta: dict) -> dict:
    """``dgc.create_model(meta["name"], **create_kwargs(meta))`` builds the model of ``meta``
    (a ``model_meta.json``: num_classes, in_chans and the recipe's kwargs; absent ones take
    the recipe's defaults)."""
    sizes = {k: meta[k] for k in ("num_classes", "in_chans") if k in meta}
    return {**sizes, **meta.get("kwargs", {})}


def build_from_meta(meta: dict, path: Path) -> torch.nn.Module:
    """The model of ``meta``: first on the meta device (no memory) to check its size."""
    import dgc

    def build() -> torch.nn.Module:
        return dgc.create_model(meta["name"], **create_kwargs(meta))

    try:
        with dgc.on_meta():
            params = sum(p.numel() for p in build().parameters())
    except (TypeError, ValueError) as err:
        raise SearchConfigError(f"{path}: cannot build {meta['name']}: {err}") from err
    if params > MAX_EXPORT_PARAMS:
        raise SearchConfigError(
            f"{path}: {meta['name']} with these settings has {params:,} parameters; refusing "
            f"more than {MAX_EXPORT_PARAMS:,}"
        )
    return build()


def _int_in(v: object, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _plain(v: object) -> bool:
    if isinstance(v, list):
        return len(v) <= 16 and all(_plain(x) for x in v if not isinstance(x, list))
    return v is None or (isinstance(v, (int, float, str)) and len(str(v)) <= 64)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SearchConfigError(f"--out {out}: is a file; give a folder (it is created)")


def write_export(model: torch.nn.Module, out: Path, size: tuple[int, ...], meta: dict) -> int:
    """Write the export into a temporary sibling folder, then swap it in: a failed export never
    leaves a mix of two models' files in ``out``."""
    import shutil
    import tempfile

    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_export_files(model, tmp, size, meta)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shape = "x".join(map(str, size))
    print(
        f"wrote {out}/model.pt (state_dict), model.json (dgc.create_model(name, num_classes=, "
        f"in_chans=, **kwargs)), model.ts (TorchScript, input Nx{shape}; `import dgc` before "
        "torch.jit.load: it calls dgc's operator that runs the eager model, as fast) and "
        "model_portable.ts (plain torch operators: loads without dgc, slower)"
    )
    return 0


def _write_export_files(
    model: torch.nn.Module, out: Path, size: tuple[int, ...], meta: dict
) -> None:
    import dgc

    model.eval()
    torch.save(model.state_dict(), out / "model.pt")
    info = {**meta, "dgc_layers": len(dgc.dgc_layers(model))}
    (out / "model.json").write_text(json.dumps(info, indent=2))
    example = torch.zeros(1, *size)
    with torch.no_grad():
        model(example)  # settles the per-shape kernel choices (and fails before any trace)
        # model.ts: the eager eval network as one dgc operator (dgc.program), as MLflow's
        shipped = dgc.ShippedModel(model, meta["name"], create_kwargs(meta), example)
        torch.jit.trace(shipped, example, check_trace=False).save(str(out / "model.ts"))
        # the DGC layers and the DenseNets' BN-ReLU-group convs
        layers = [m for m in model.modules() if _ships_op(m)]
        try:  # plain torch operators: the kernels timed fastest at batch 1 are recorded
            for layer in layers:
                layer.ship_op = False
            model(example)
            traced = torch.jit.trace(model, example, check_trace=False)
        finally:
            for layer in layers:
                layer.ship_op = True
    traced.save(str(out / "model_portable.ts"))
