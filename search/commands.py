"""The CLI's commands other than launch: validate, pareto and export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from search.config import load_experiment
from search.overrides import SearchConfigError
from search.preflight import run_preflight
from search.tracking import tracking_uri as using_uri

log = logging.getLogger(__name__)


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
    return 0


def pareto_command(target: str, register: bool, tracking_uri: str | None = None) -> int:
    """Rank, tag and plot a search given its folder or its MLflow parent run id."""
    from search.launch import open_search
    from search.launch import rank

    folder = Path(target) if Path(target).is_dir() else _folder_of_run(target, tracking_uri)
    exp, state, tracking = open_search(folder.resolve())
    print(rank(exp, state, tracking, register))
    print(f"\nplot: {folder / 'pareto.png'} and {folder / 'pareto.html'}")
    return 0


def _folder_of_run(run_id: str, tracking_uri: str | None) -> Path:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri or mlflow.get_tracking_uri())
    try:
        folder = client.get_run(run_id).data.tags.get("search_dir")
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

    import dgc

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    with using_uri(uri):
        run_id = (
            mlflow.models.get_model_info(source).run_id if source.startswith("models:/") else source
        )
        try:
            meta_path = client.download_artifacts(run_id, "dgc/model_meta.json")
            weights = client.download_artifacts(run_id, "dgc/weights.pt")
        except (OSError, mlflow.exceptions.MlflowException) as err:
            raise SearchConfigError(
                f"{source}: no exported dgc weights in run {run_id} (only "
                "Pareto models have them; run `python -m search pareto "
                f"DIR` first): {err}"
            ) from err
    meta = json.loads(Path(meta_path).read_text())
    model = dgc.create_model(
        meta["name"], num_classes=meta["num_classes"], in_chans=meta["in_chans"], **meta["kwargs"]
    )
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return write_export(
        model, Path(out), tuple(meta["input_size"]), {**meta, "source": source, "run_id": run_id}
    )


def write_export(model: torch.nn.Module, out: Path, size: tuple[int, ...], meta: dict) -> int:
    import dgc

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save(model.state_dict(), out / "model.pt")
    info = {**meta, "dgc_layers": len(dgc.dgc_layers(model))}
    (out / "model.json").write_text(json.dumps(info, indent=2))
    example = torch.zeros(1, *size)
    with torch.no_grad():
        model(example)  # DGC layers choose their fastest kernels at batch 1; the trace keeps them
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(out / "model.ts"))
    print(
        f"wrote {out}/model.pt (state_dict), model.json (dgc.create_model(name, num_classes=, "
        f"in_chans=, **kwargs)) and model.ts (TorchScript, input Nx{'x'.join(map(str, size))})"
    )
    return 0
