from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from search.__main__ import main
from spaces.convert import apply_to_trial
from tests.helpers import REPO
from tests.helpers import alias_bomb
from tests.helpers import write_cifar
from tests.helpers import write_imagefolder

GOOD = {
    "name": "t",
    "trial": {"model": {"name": "dyresnet8"}, "epochs": 1},
    "space": "tiny.yaml",
    "num_trials": 4,
}


def _write(tmp_path, doc) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _launch_in_a_new_process(cwd, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``launch *args`` as a user runs it, in a new Python from ``cwd``; its stdout ends with
    ``RC <exit code> RAY <whether Ray was started>``."""
    code = (
        "import sys, ray; from search.__main__ import main; rc = main(['launch', *sys.argv[1:]]);"
        " print('RC', rc, 'RAY', ray.is_initialized())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _with(**changes):
    """GOOD with changes; ``a__b`` stands for the dotted key ``a.b``."""
    return apply_to_trial(GOOD, {k.replace("__", "."): v for k, v in changes.items()})


BAD = [
    (
        "unknown key",
        _with(num_trails=4),
        "num_trails = 4: unknown key (remove it or check its spelling)",
    ),
    (
        "wrong type",
        _with(num_trials="many"),
        "num_trials = 'many': Input should be a valid integer",
    ),
    (
        "empty space",
        _with(space={"params": {}}),
        "space.params = {}: Dictionary should have at least 1 item",
    ),
    (
        "low > high",
        _with(space={"params": {"model.gate_factor": {"type": "float", "low": 0.9, "high": 0.1}}}),
        "low=0.9 > high=0.1; swap them",
    ),
    (
        "heads cannot divide a stage",
        _with(space={"params": {"model.heads": {"type": "categorical", "choices": [2, 3]}}}),
        "space.params.model.heads = 3: stages.0.0.conv1: heads=3 must divide both in_channels=16",
    ),
    (
        "budget below every configuration",
        _with(budget={"macs": 1000}),
        "budget.macs = 1000 is below every configuration of the space",
    ),
    (
        "budget almost no point meets",
        _with(budget={"macs": 230000}),
        "budget.macs = 230000: only 0 of 32 random points of the space are within it",
    ),
    (
        "missing dataset",
        _with(trial__data={"dataset": "cifar10", "datadir": "/nonexistent/cifar"}),
        "data.datadir='/nonexistent/cifar' does not exist; cifar10 expects cifar-10-batches-py",
    ),
    (
        "unknown objective",
        _with(objectives=[{"metric": "accuracy"}]),
        "unknown objective metric 'accuracy'",
    ),
    ("unknown model", _with(trial__model={"name": "dyresnet9"}), "unknown model name='dyresnet9'"),
    ("name with a trailing newline", _with(name="t\n"), "must be 1 to 100 letters"),
    ("name too long", _with(name="n" * 101), "must be 1 to 100 letters"),
    ("name with a control character", _with(name="a\x07b"), "must be 1 to 100 letters"),
    (
        "float log and step",
        _with(
            space={
                "params": {
                    "optim.lr": {
                        "type": "float",
                        "low": 0.01,
                        "high": 0.1,
                        "log": True,
                        "step": 0.01,
                    }
                }
            }
        ),
        "log=true and step=0.01 cannot be combined",
    ),
    (
        "int log and step",
        _with(
            space={
                "params": {
                    "model.squeeze_rate": {
                        "type": "int",
                        "low": 2,
                        "high": 16,
                        "log": True,
                        "step": 2,
                    }
                }
            }
        ),
        "log=true and step=2 cannot be combined",
    ),
    (
        "infinite bound",
        _with(space={"params": {"optim.lr": {"type": "float", "low": 0.01, "high": float("inf")}}}),
        "bounds must be finite numbers",
    ),
    (
        "NaN bound",
        _with(space={"params": {"optim.lr": {"type": "float", "low": float("nan"), "high": 0.1}}}),
        "bounds must be finite numbers",
    ),
    ("sampler seed out of range", _with(sampler={"seed": 2**40}), "sampler.seed = 1099511627776"),
    ("trial seed out of range", _with(trial__seed=-1), "trial.seed = -1"),
    (
        "model kwargs the recipe does not take",
        _with(trial__model={"name": "dyresnet8", "kwargs": {"bogus": 3}}),
        "trial.model.kwargs = {'bogus': 3}: ResNet.__init__() got an unexpected keyword argument 'bogus'",
    ),
    (
        "val_size larger than the data",
        _with(trial__data={"dataset": "digits", "val_size": 5000}),
        "data.val_size=5000.0 gives 5000 validation images of 1438 training images",
    ),
    (
        "another operator's setting",
        _with(space={"params": {"model.compression": {"type": "float", "low": 0.3, "high": 0.6}}}),
        "space.params.model.compression = 0.3: compression=0.3 is a setting of the 'selfgroup' operator (models sg...)",
    ),
    (
        "model choices with different stages and a per-stage parameter",
        _with(
            space={
                "params": {
                    "model.name": {"type": "categorical", "choices": ["dyresnet8", "dyresnet18"]},
                    "model.gate_factor": {
                        "type": "float",
                        "low": 0.3,
                        "high": 0.6,
                        "per_stage": True,
                    },
                }
            }
        ),
        "space: the models of model.name have different numbers of stages (trial.model.name: 3, "
        "space.params.model.name = 'dyresnet8': 3, space.params.model.name = 'dyresnet18': 4)",
    ),
    (
        "unknown model among the choices",
        _with(
            space={
                "params": {
                    "model.name": {"type": "categorical", "choices": ["sgresnet8", "sgresnet9"]}
                }
            }
        ),
        "space.params.model.name = 'sgresnet9': unknown model name='sgresnet9'",
    ),
    (
        "condition on a later parameter",
        _with(
            space={
                "params": {
                    "model.kernels": {
                        "type": "int",
                        "low": 2,
                        "high": 4,
                        "when": {"model.name": ["dnresnet8"]},
                    },
                    "model.name": {"type": "categorical", "choices": ["dnresnet8"]},
                }
            }
        ),
        "'model.name' is not a parameter listed before 'model.kernels'",
    ),
    (
        "space key not in the trial config",
        _with(
            space={"params": {"optim.learning_rate": {"type": "float", "low": 0.01, "high": 0.1}}}
        ),
        "trial.optim.learning_rate",
    ),
    (
        "time budget that is not a duration",
        _with(stop={"epochs": 40, "time": "8 hours"}),
        "stop.time = '8 hours': time='8 hours' is not a duration; write it as e.g. \"8h\"",
    ),
    ("epoch budget of 0", _with(stop={"epochs": 0}), "stop.epochs = 0"),
    (
        "epoch budget below one trial",
        _with(stop={"epochs": 3}, trial__epochs=4),
        "stop.epochs=3 is below trial.epochs=4: no trial could finish",
    ),
    (
        "hypervolume reference of a metric that is not an objective",
        _with(hypervolume={"reference": {"latency_ms": 5}}),
        "hypervolume.reference sets ['latency_ms'], which are not objectives",
    ),
    (
        "hypervolume reference above the best accuracy",
        _with(hypervolume={"reference": {"val_accuracy": 1.2}}),
        "reference.val_accuracy=1.2 must be in [0, 1)",
    ),
    (
        "TPE options on another sampler",
        _with(sampler={"name": "random", "group": True}),
        "group only apply to name: tpe, but name='random'",
    ),
]


@pytest.mark.parametrize("doc,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_experiment_files_are_rejected_with_their_message(tmp_path, capsys, doc, message):
    path = _write(tmp_path, doc)
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert path in err and message in err, err


def test_launch_of_a_bad_file_fails_before_any_cluster_starts(tmp_path):
    path = _write(tmp_path, _with(budget={"macs": 1000}))
    out = _launch_in_a_new_process(tmp_path, path, timeout=120)
    assert "RC 2 RAY False" in out.stdout, out.stdout + out.stderr
    assert not (tmp_path / "runs").exists()


def test_validate_good_files_and_set_overrides(tmp_path, capsys):
    assert main(["validate", str(REPO / "experiments" / "quickstart.yaml")]) == 0
    assert "M MACs" in capsys.readouterr().out
    path = _write(tmp_path, GOOD)
    assert main(["validate", path, "--set", "budget.macs=500000"]) == 0
    out = capsys.readouterr().out
    assert "over the budget" in out
    assert "hypervolume reference point (the worst point that counts): val_accuracy 0, " in out
    assert main(["validate", path, "--set", "stop={epochs: 30}"]) == 0
    assert "stop.epochs=30 buys about" in capsys.readouterr().out
    assert main(["validate", path, "--set", "trial.epochz=3"]) == 2
    assert "trial.epochz = 3: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "experiments").glob("*.yaml")))
def test_every_shipped_experiment_validates(name):
    path = REPO / "experiments" / name
    on_disk = yaml.safe_load(path.read_text())["trial"]["data"]["dataset"] != "digits"
    # CIFAR experiments read the user's data: everything else is checked on digits here.
    assert main(["validate", str(path), *(["--set", "trial.data.dataset=digits"] * on_disk)]) == 0


def test_launch_refuses_to_overwrite_an_existing_search(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "search.json").write_text("{}")
    path = _write(tmp_path, _with(storage_dir=str(tmp_path)))
    assert main(["launch", path]) == 2
    assert "already holds a search; continue it with" in capsys.readouterr().err


def test_launch_with_an_address_nobody_listens_on_fails_fast_and_writes_nothing(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _write(tmp_path, GOOD)
    start = time.monotonic()
    out = _launch_in_a_new_process(tmp_path, path, "--address", f"127.0.0.1:{port}", timeout=120)
    assert time.monotonic() - start < 30  # ray.init alone waits for minutes
    assert "RC 2 RAY False" in out.stdout, out.stdout + out.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in out.stderr
    assert "ray start --head" in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_file_that_is_not_utf8_text_is_named(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"name: t\nnum_trials: 4\n# caf\xe9\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not UTF-8 text" in err


def test_yaml_tags_in_set_are_refused(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    assert (
        main(["validate", path, "--set", "num_trials=!!python/object/apply:os.system [true]"]) == 2
    )
    err = capsys.readouterr().err
    assert "--set num_trials: not valid YAML" in err and "Traceback" not in err


def test_an_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb() + "name: t\n")  # 10**9 values once expanded
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "expands to more than 100000 values" in err and len(err) < 1000


def test_an_alias_bomb_in_the_space_file_is_refused_naming_that_file(tmp_path, capsys):
    space = tmp_path / "bomb_space.yaml"
    space.write_text(alias_bomb() + "params: {}\n")
    assert main(["validate", _write(tmp_path, {**GOOD, "space": str(space)})]) == 2
    err = capsys.readouterr().err
    assert f"space: {space}: expands to more than 100000 values" in err and len(err) < 1000


@pytest.mark.parametrize("resource", ["resources.gpu=1", "resources.cpu=64"])
def test_a_resource_request_the_local_cluster_cannot_meet_is_refused_and_nothing_written(
    tmp_path, resource
):
    path = _write(tmp_path, GOOD)
    out = _launch_in_a_new_process(tmp_path, path, "--set", resource)
    assert "RC 2" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "per trial, but the local cluster this file starts has" in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_validate_reads_the_data_and_names_a_truncated_cifar_batch(tmp_path, capsys):
    write_cifar(tmp_path, 20, 10)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    batch.write_bytes(batch.read_bytes()[:500])  # an interrupted download
    doc = _with(trial__data={"dataset": "cifar10", "datadir": str(tmp_path), "val_size": 10})
    assert main(["validate", _write(tmp_path, doc)]) == 2
    err = capsys.readouterr().err
    assert "data_batch_4: not a CIFAR python batch" in err


@pytest.mark.parametrize("damage", ["state", "resolved"])
def test_a_damaged_search_folder_is_a_message_not_a_traceback(tmp_path, capsys, damage):
    from search.state import RESOLVED_FILE
    from search.state import STATE_FILE

    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text('{"folder": ' if damage == "state" else json.dumps({}))
    (folder / RESOLVED_FILE).write_text("name: [unclosed")
    assert main(["pareto", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "damaged search state" in err and str(folder / STATE_FILE) in err


def test_launch_names_a_non_image_behind_an_image_suffix_and_writes_nothing(tmp_path):
    data = tmp_path / "data"
    write_imagefolder(data)
    (data / "train" / "dog" / "zz_notes.jpg").write_text("a text file, not a JPEG\n")
    doc = _with(
        trial__data={"dataset": "imagefolder", "datadir": str(data), "val_size": 2},
        ray={"dashboard": False, "num_cpus": 1},
    )
    path = _write(tmp_path, doc)
    out = _launch_in_a_new_process(tmp_path, path)
    assert "RC 2" in out.stdout, out.stdout + out.stderr[-3000:]
    assert f"{path}: trial.data: 1 unreadable image file(s)" in out.stderr
    assert "zz_notes.jpg: not a readable image" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
