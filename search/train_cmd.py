"""``python -m search train FILE``: one configuration in the foreground, no Ray."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from search.overrides import SearchConfigError
from search.overrides import apply_overrides
from search.overrides import load_yaml
from spaces.errors import format_validation_error
from trainables import metrics as M
from trainables.config import TrialConfig
from trainables.runner import STATE_FILE
from trainables.runner import load_state
from trainables.runner import pretrain_epochs
from trainables.runner import record_epoch
from trainables.runner import run_trial

log = logging.getLogger(__name__)


def trial_config_from_file(path: str, overrides: list[str]) -> TrialConfig:
    """A trial-config YAML, or an experiment YAML whose ``trial:`` section is used."""
    doc = load_yaml(path)
    if isinstance(doc.get("trial"), dict):  # an experiment: its trial: section
        # --set as for launch (trial.epochs=2), or a trial key alone (model.name=gcresnet8)
        overrides = [o if o.startswith("trial.") else _as_trial_key(o, path) for o in overrides]
        trial = apply_overrides(doc, overrides, path)["trial"]
    else:  # a bare trial config: the same keys, with or without the "trial." prefix
        trial = apply_overrides(doc, [o.removeprefix("trial.") for o in overrides], path)
    try:
        return TrialConfig.model_validate(trial)
    except ValidationError as err:
        raise SearchConfigError(
            format_validation_error(err, path, prefix="trial" if trial is not doc else "")
        ) from err


def _as_trial_key(override: str, path: str) -> str:
    key = override.split("=", 1)[0]
    if key.split(".", 1)[0] not in TrialConfig.model_fields:
        raise SearchConfigError(
            f"{path}: --set {override!r}: train runs the file's trial: section, so only its "
            f"keys apply ({', '.join(sorted(TrialConfig.model_fields))}), with or without "
            "the trial. prefix"
        )
    return "trial." + override


class ConsoleReporter:
    """Progress bar over epochs; optional checkpoints and metrics in ``out``."""

    def __init__(self, epochs: int, start: int, out: Path | None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=epochs, initial=start, unit="epoch", dynamic_ncols=True)
        self.out = out

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{metrics[M.TRAIN_LOSS]:.3f}",
            val_acc=f"{metrics[M.VAL_ACCURACY]:.4f}",
            img_s=f"{metrics[M.IMAGES_PER_S]:.0f}",
        )
        if self.out is not None:
            record_epoch(self.out, metrics, state)


def train_command(path: str, overrides: list[str], out: str | None, resume: bool) -> int:
    cfg = trial_config_from_file(path, overrides)
    out_dir = Path(out) if out else None
    state = None
    if resume:
        if out_dir is None or not (out_dir / STATE_FILE).is_file():
            raise SearchConfigError(
                f"--resume needs --out DIR holding a state.pt from an earlier run (got {out_dir})"
            )
        state = load_state(out_dir / STATE_FILE)
    start = int(state["epoch"]) if state else pretrain_epochs(cfg)  # pretraining logs itself
    reporter = ConsoleReporter(cfg.epochs, start, out_dir)
    final = run_trial(cfg, reporter, state)
    reporter.bar.close()
    print(json.dumps({k: final[k] for k in sorted(final)}, indent=2))
    return 0
