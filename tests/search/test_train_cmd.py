"""python -m search train: one configuration in the foreground, --set as for launch."""

from __future__ import annotations

import json

import yaml

from search.__main__ import main
from tests.helpers import REPO

SMOKE = str(REPO / "experiments" / "smoke.yaml")


def test_train_an_experiment_file_with_launch_style_overrides(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "train",
            SMOKE,
            "--set",
            "trial.epochs=1",
            "--set",
            "trial.model.heads=2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1] and 0.0 <= lines[-1]["val_accuracy"] <= 1.0
    assert (out / "state.pt").is_file()


def test_train_a_bare_trial_config_takes_the_same_keys(tmp_path):
    trial = yaml.safe_load(open(SMOKE))["trial"]
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(trial))
    assert main(["train", str(path), "--set", "trial.epochs=1", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", str(path), "--set", "epochs=1", "--out", str(tmp_path / "b")]) == 0


def test_train_refuses_overrides_outside_the_trial_section(tmp_path, capsys):
    assert main(["train", SMOKE, "--set", "num_trials=3"]) == 2
    assert "--set 'num_trials=3': train runs the file's trial: section, so only its keys" in (
        capsys.readouterr().err
    )


def test_train_an_experiment_with_trial_keys_unprefixed(tmp_path):
    out = tmp_path / "gc"
    args = ["train", SMOKE, "--set", "model.name=gcresnet8", "--set", "epochs=1"]
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["macs"] == 391562
