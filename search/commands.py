"""The CLI's commands other than launch: validate, pareto and export."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from search.config import load_experiment
from search.overrides import SearchConfigError
from search.preflight import run_preflight

log = logging.getLogger(__name__)


def validate_command(path: str, overrides: list[str]) -> int:
    """Validate the file and the space (models built on the meta device); no cluster."""
    exp = load_experiment(path, overrides)
    report = run_preflight(exp, path)
    print(f"{path}: OK: {exp.num_trials} trials of {exp.trial.model.name} on "
          f"{exp.trial.data.dataset}, objectives "
          f"{', '.join(f'{o.metric} ({o.direction})' for o in exp.objectives)}")
    print(report.summary(exp.budget.macs))
    return 0


def pareto_command(target: str, register: bool) -> int:
    """Rank, tag and plot a search given its folder or its MLflow parent run id."""
    from search.launch import SearchState
    from search.results import finalize
    from search.tracking import Tracking

    import yaml

    from search.config import ExperimentConfig
    from search.launch import RESOLVED_FILE

    folder = Path(target)
    if not folder.is_dir():
        raise SearchConfigError(f"{target}: give the search folder printed by `launch` (it holds "
                                "search.json); a bare run id needs its folder for the config")
    state = SearchState.load(folder)
    exp = ExperimentConfig.model_validate(yaml.safe_load((folder / RESOLVED_FILE).read_text()))
    tracking = Tracking(state.tracking_uri, state.mlflow_experiment, state.parent_run_id)
    objectives = [(o.metric, o.direction) for o in exp.objectives]
    text = finalize(tracking, objectives, list(exp.space.params), folder,
                    exp.name if register else None, state.num_classes, tuple(state.input_size))
    print(text)
    print(f"\nplot: {folder / 'pareto.png'} and {folder / 'pareto.html'}")
    return 0


def export_command(source: str, out: str, tracking_uri: str | None) -> int:
    """Write weights (state_dict), the trial config and TorchScript for a logged model.

    ``source``: a model URI (``models:/<registered>@<alias>``, ``models:/m-...``) or a run id.
    """
    import mlflow

    from search.tracking import tracking_uri as using

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    model_uri = source if "://" in source or source.startswith("models:/") else \
        client.get_run(source).data.tags.get("model_uri")
    if not model_uri:
        raise SearchConfigError(f"run {source} has no logged model (only Pareto runs do); "
                                "run `python -m search pareto DIR` first")
    with using(uri):
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    return write_export(model, Path(out), {"source": source, "model_uri": model_uri})


def write_export(model: torch.nn.Module, out: Path, meta: dict) -> int:
    import dgc

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save(model.state_dict(), out / "model.pt")
    info = {**meta, "class": type(model).__name__, "num_classes": model.num_classes,
            "dgc_layers": len(dgc.dgc_layers(model))}
    (out / "model.json").write_text(json.dumps(info, indent=2))
    size = _input_size(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, *size), check_trace=False)
    traced.save(str(out / "model.ts"))
    print(f"wrote {out}/model.pt (state_dict: dgc.create_model(...) + load_state_dict), "
          f"model.json and model.ts (TorchScript, input 1x{'x'.join(map(str, size))})")
    return 0


def _input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return (first.in_channels, 8, 8) if first.in_channels == 1 else (first.in_channels, 32, 32)
