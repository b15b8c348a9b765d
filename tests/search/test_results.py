from __future__ import annotations

from search.results import Point
from search.results import _alias


def _point(run_id: str, macs: float) -> Point:
    return Point(run_id, "trial-1", (0.9, macs), {"macs": macs}, {})


def test_aliases_of_nearly_equal_macs_differ_and_are_stable():
    a = _point("0123456789abcdef0123456789abcdef", 414_123)
    b = _point("fedcba9876543210fedcba9876543210", 414_456)  # same 3 significant digits
    assert _alias(a) == "macs-0p414m-01234567"
    assert _alias(b) == "macs-0p414m-fedcba98"
    assert _alias(a) == _alias(_point(a.run_id, 414_123))  # a run's alias never changes


def _ranked(name, acc, macs, rank, **kw) -> Point:
    params = {"model.heads": "4", "model.gate_factor": "[0.4026332820318257, 0.573048618285045]"}
    return Point(name + "0" * 32, name, (acc, macs), {"val_accuracy": acc, "macs": macs,
                 "params": 87290.0, "test_accuracy": 0.5}, params, rank, **kw)  # fmt: skip


def test_the_table_is_for_people_rounded_with_load_uris_and_no_test_column():
    from search.plots import heading
    from search.results import table

    pts = [
        _ranked("trial-6", 0.52333, 378410, 1, alias="macs-0p378m-7207b96c"),
        _ranked("ref-dense", 0.99, 768394, 1, reference="dense"),
        _ranked("trial-2", 0.4, 500000, 2),
        _ranked("ref-group-0.5", 0.45, 520000, 2, reference="static_group"),
        _ranked("trial-3", 0.3, 600000, 0, stopped=2),
    ]
    objectives = [("val_accuracy", "max"), ("macs", "min")]
    text = table(pts, objectives, ["model.heads", "model.gate_factor"], "smoke")
    assert text.splitlines() == [
        "| trial | val_accuracy | macs | params | heads | gate_factor | load with |",
        "|---|---|---|---|---|---|---|",
        "| trial-6 | 52.33% | 0.378 M | 0.087 M | 4 | [0.403, 0.573] | "
        "`models:/smoke@macs-0p378m-7207b96c` |",
        "| ref-dense | 99.00% | 0.768 M | 0.087 M | 4 | [0.403, 0.573] | - |",
    ]
    assert "test" not in text
    assert (
        heading(pts, "smoke")
        == "smoke: 2 of 4 trials on the front (1 of the 2 references, 1 stopped early)"
    )


def test_the_mlflow_table_links_each_run_and_registered_version():
    from search.results import table

    pts = [
        _ranked("trial-6", 0.52333, 378410, 1, alias="macs-0p378m-7207b96c", version="4"),
        _ranked("ref-dense", 0.99, 768394, 1, reference="dense"),
    ]
    objectives = [("val_accuracy", "max"), ("macs", "min")]
    rows = table(pts, objectives, ["model.heads"], "smoke", experiment_id="7").splitlines()
    assert rows[2] == (
        f"| [trial-6](#/experiments/7/runs/{pts[0].run_id}) | 52.33% | 0.378 M | 0.087 M | 4 | "
        "[`models:/smoke@macs-0p378m-7207b96c`](#/models/smoke/versions/4) |"
    )
    assert rows[3].startswith(f"| [ref-dense](#/experiments/7/runs/{pts[1].run_id}) |")
    assert rows[3].endswith("| - |")  # not registered: nothing to link


def test_a_registered_version_carries_only_the_settings_its_network_has(tmp_path, mlflow_db):
    from search.results import _describe_version
    from search.tracking import Tracking

    tracking = Tracking(mlflow_db, "smoke")
    tracking.client.create_registered_model("smoke")
    version = tracking.client.create_model_version("smoke", str(tmp_path)).version
    dense = _ranked("ref-dense", 0.99, 768394, 1)
    dense.params = {"model.name": "resnet8", "model.heads": "None", "model.kwargs": "{}",
                    "model.gate_factor": "null", "epochs": "2"}  # fmt: skip
    _describe_version(tracking, "smoke", version, dense)
    mv = tracking.client.get_model_version("smoke", version)
    assert mv.tags == {
        "val_accuracy": "0.99",
        "macs": "768394",
        "params": "87290",
        "model.name": "resnet8",
    }
    assert "None" not in mv.description and "model.name=resnet8" in mv.description


def test_the_plots_mark_references_and_stopped_trials(tmp_path):
    from search.plots import write_plots

    pts = [
        _ranked("trial-6", 0.52333, 378410, 1, alias="macs-0p378m-7207b96c"),
        _ranked("ref-group-0.5", 0.99, 391562, 1, reference="group-0.5"),
        _ranked("trial-2", 0.4, 500000, 2),
        _ranked("trial-3", 0.3, 600000, 0, stopped=2),
    ]
    png, html = write_plots(
        pts,
        [("val_accuracy", "max"), ("macs", "min")],
        ["model.heads"],
        tmp_path,
        "smoke: 2 of 3 trials on the front",
    )
    assert png.stat().st_size > 10_000
    page = html.read_text()
    for text in (
        "reference (dense, static group)",
        "(reference: group-0.5)",
        "stopped early at epoch 2",
        "alias @macs-0p378m-7207b96c",
        '"shape":"hv"',
        "MACs (M)",
        "validation accuracy (%)",
        "smoke: 2 of 3 trials on the front",
    ):
        assert text in page, text


def test_a_logged_dgc_model_loads_in_a_fresh_process_after_import_dgc(tmp_path, mlflow_db):
    """The Pareto models are logged as MLflow's pt2 (torch.export) of dgc.ShippedModel, the
    network as one dgc operator: a process that imports dgc loads and runs them; one that
    does not is told which operator is missing."""
    import subprocess
    import sys

    import mlflow
    import numpy as np
    import torch

    import dgc

    uri = mlflow_db
    torch.manual_seed(0)
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, gate_factor=0.25).eval()
    dgc.set_progress(model, 1.0)
    example = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    torch.save(expected, tmp_path / "expected.pt")
    np.save(tmp_path / "x.npy", x)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            shipped = dgc.ShippedModel(
                model, "dyresnet8", {"num_classes": 10, "in_chans": 1, "gate_factor": 0.25},
                torch.from_numpy(example),
            )  # fmt: skip
            info = mlflow.pytorch.log_model(shipped, name="model", input_example=example)
    finally:
        mlflow.set_tracking_uri(None)
    load = f"import mlflow; mlflow.set_tracking_uri({uri!r}); m = mlflow.pytorch.load_model({info.model_uri!r})\n"
    check = (
        "import numpy as np, torch\n"
        f"y = m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))\n"
        f"torch.testing.assert_close(y, torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True))\n"
        # the tensors packed one buffer per dtype, the network one operator
        "assert set(m.state_dict()) == {'tensors_float32', 'tensors_int64'}, list(m.state_dict())\n"
        "assert str(m.graph).count('dgc.model_eval') == 1, m.graph\n"
    )
    run = lambda code: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # noqa: E731
    done = run("import dgc\n" + load + check)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run(load)
    assert done.returncode != 0 and "dgc.model_eval" in done.stderr
