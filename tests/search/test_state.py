"""The saved state of a search folder: validated, and free of credentials."""

from __future__ import annotations

import pytest

from search.config import load_experiment
from search.overrides import SearchConfigError
from search.preflight import Problem
from search.redact import STORAGE_ENV
from search.state import SearchState
from search.state import load_search
from search.state import new_state
from search.state import write_resolved
from tests.helpers import REPO

SMOKE = REPO / "experiments" / "smoke.yaml"
URL = "postgresql://admin:pw-123@db.example/optuna"


def _saved(tmp_path, source=None, overrides=()):
    exp = load_experiment(source or SMOKE, [f"storage_dir={tmp_path}", *overrides])
    folder = exp.experiment_dir
    folder.mkdir(parents=True)
    state = new_state(exp, Problem(10, (1, 8, 8), 3), folder, str(source), list(overrides))
    assert source is None or state.experiment_file == str(source)
    state.parent_run_id = "p"
    state.save(folder)
    write_resolved(folder, exp)
    return folder


def test_no_credential_is_stored_and_the_environment_gives_it_back(tmp_path, monkeypatch):
    folder = _saved(tmp_path, SMOKE, [f"optuna_storage={URL}"])
    for path in folder.iterdir():
        assert "pw-123" not in path.read_text(), path
    assert SearchState.load(folder).optuna_storage == "postgresql://admin:***@db.example/optuna"
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    with pytest.raises(SearchConfigError, match=f"lacks its credential.*{STORAGE_ENV}"):
        load_search(folder)
    monkeypatch.setenv(STORAGE_ENV, "postgresql://admin:pw-9@elsewhere/optuna")  # not this one
    with pytest.raises(SearchConfigError, match="lacks its credential"):
        load_search(folder)
    monkeypatch.setenv(STORAGE_ENV, URL)
    assert load_search(folder)[1].optuna_storage == URL


def test_the_users_experiment_file_gives_the_credential_back(tmp_path, monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    source = tmp_path / "exp.yaml"
    source.write_text(SMOKE.read_text() + f"optuna_storage: {URL}\n")
    folder = _saved(tmp_path, source)
    assert load_search(folder)[1].optuna_storage == URL


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_classes", "ten", "num_classes = 'ten': Input should be a valid integer"),
        ("input_size", [1, 8], "input_size = [1, 8]: List should have at least 3 items"),
        ("study_name", None, "study_name = None: Input should be a valid string"),
        ("surprise", 1, "surprise = 1: unknown key"),
    ],
)
def test_a_search_json_with_bad_fields_is_named(tmp_path, field, value, message):
    import json

    folder = _saved(tmp_path)
    doc = json.loads((folder / "search.json").read_text())
    (folder / "search.json").write_text(json.dumps({**doc, field: value}))
    with pytest.raises(SearchConfigError, match="damaged search state") as err:
        SearchState.load(folder)
    assert message in str(err.value) and str(folder / "search.json") in str(err.value)
