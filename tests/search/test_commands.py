"""search export: the model description is checked before anything is built, and the export is
written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

import dgc
from search.commands import export_command
from search.commands import read_model_meta
from search.commands import write_export
from search.overrides import SearchConfigError
from tests.dgc.helpers import calibrated
from tests.helpers import python

META = {
    "name": "dyresnet8",
    "num_classes": 10,
    "in_chans": 1,
    "kwargs": {"heads": 2, "gate_factor": 0.25},
    "input_size": [1, 8, 8],
}


def _meta_file(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "model_meta.json"
    path.write_text(json.dumps({**META, **changes}))
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_classes": 10**9}, "num_classes=1000000000 must be an int in [1, 100000]"),
        ({"name": "os.system"}, "name='os.system' is not a registered model"),
        ({"input_size": [1, 10**6, 8]}, "input_size=[1, 1000000, 8] must be"),
        ({"kwargs": {"heads": {"x": 1}}}, "kwargs={'heads': {'x': 1}} must map names"),
        ({"extra": 1}, "expected exactly name, num_classes"),
    ],
)
def test_tampered_model_meta_is_refused_before_anything_is_built(tmp_path, changes, message):
    path = _meta_file(tmp_path, **changes)
    with pytest.raises(SearchConfigError) as info:
        read_model_meta(path)
    assert str(path) in str(info.value) and message in str(info.value)


def _logged_run(tmp_path: Path, meta: dict) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp).info.run_id
    torch.manual_seed(0)
    model = dgc.create_model(META["name"], num_classes=10, in_chans=1, **META["kwargs"])
    dgc.set_progress(model, 1.0)
    folder = tmp_path / "logged"  # not "dgc": a folder of that name would shadow the package
    folder.mkdir()
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "model_meta.json").write_text(json.dumps(meta))
    client.log_artifacts(run, str(folder), "dgc")
    return uri, run


def test_a_huge_model_in_the_meta_is_refused_without_allocating(tmp_path, capsys):
    uri, run = _logged_run(tmp_path, {**META, "kwargs": {"widths": [60000, 60000, 60000]}})
    with pytest.raises(SearchConfigError, match=r"parameters; refusing more than"):
        export_command(run, str(tmp_path / "out"), uri)
    assert not (tmp_path / "out").exists()


def test_export_writes_a_working_model_and_replaces_an_old_export_whole(tmp_path, capsys):
    uri, run = _logged_run(tmp_path, META)
    out = tmp_path / "out"
    assert export_command(run, str(out), uri) == 0
    assert export_command(run, str(out), uri) == 0  # again: replaced, not mixed
    names = ["model.json", "model.pt", "model.ts", "model_portable.ts"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    model = dgc.create_model(META["name"], num_classes=10, in_chans=1, **META["kwargs"])
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        eager = model.eval()(x)
        for name in ("model.ts", "model_portable.ts"):
            torch.testing.assert_close(torch.jit.load(str(out / name))(x), eager)


def test_a_densenet_export_ships_one_operator_and_a_portable_trace(tmp_path, capsys):
    # model.ts is the eager network as dgc's operator (its in-place DenseNet stages and native
    # group convs included); model_portable.ts traces torch's modules, stages in place.
    model = calibrated("dydensenet86")
    meta = {"name": "dydensenet86", "num_classes": 10, "in_chans": 3, "kwargs": {}}
    assert write_export(model.eval(), tmp_path / "out", (3, 16, 16), meta) == 0
    x = torch.randn(2, 3, 16, 16)
    ts, portable = (
        torch.jit.load(str(tmp_path / "out" / n)) for n in ("model.ts", "model_portable.ts")
    )
    assert str(ts.inlined_graph).count("dgc::model_eval") == 1
    assert "dgc::" not in str(portable.inlined_graph)
    with torch.no_grad():
        eager = model(x)
        assert torch.isfinite(eager).all()
        torch.testing.assert_close(ts(x), eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(portable(x), eager, rtol=1e-4, atol=1e-4)


def test_exported_torchscript_loads_in_a_fresh_process(tmp_path):
    """model_portable.ts needs torch only; model.ts needs ``import dgc`` (its operator), and
    says so when it is missing."""
    uri, run = _logged_run(tmp_path, META)
    out = tmp_path / "out"
    assert export_command(run, str(out), uri) == 0
    script = f"""
import sys, torch
x = torch.randn(2, 1, 8, 8)
portable = torch.jit.load({str(out / "model_portable.ts")!r})(x)
assert "dgc" not in sys.modules
try:
    torch.jit.load({str(out / "model.ts")!r})
except RuntimeError as err:
    assert "dgc::model_eval" in str(err), err
else:
    raise AssertionError("model.ts loaded without its operator")
import dgc
torch.testing.assert_close(torch.jit.load({str(out / "model.ts")!r})(x), portable)
print("ok")
"""
    done = python(script)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_failed_export_leaves_the_previous_one_intact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_text("previous export")

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_export(Broken(), out, (1, 8, 8), {})
    assert (out / "model.pt").read_text() == "previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_to_a_file_and_from_an_unknown_alias_are_clear_errors(tmp_path):
    uri, run = _logged_run(tmp_path, META)
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(SearchConfigError, match="is a file; give a folder"):
        export_command(run, str(target), uri)
    with pytest.raises(SearchConfigError, match="models:/nosuch@nope: no exported dgc model"):
        export_command("models:/nosuch@nope", str(tmp_path / "out"), uri)
