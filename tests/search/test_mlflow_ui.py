"""The front's saved view and the parent run's description, written to a real (SQLite) MLflow
store. That MLflow's UI opens them as intended is checked in a browser by
tests/search/test_e2e_windows.py."""

from __future__ import annotations

import json

from search.mlflow_ui import VIEW_TAG
from search.mlflow_ui import front_link
from search.mlflow_ui import publish_front
from search.tracking import Tracking


def test_the_saved_view_lists_the_search_front_flat_sorted_by_macs_with_its_columns(
    tmp_path, mlflow_db
):
    tracking = Tracking(mlflow_db, "smoke")
    parent = tracking.start_parent("smoke", {}, {})
    table = "| trial | macs |\n|---|---|\n" + "| [trial-1](#/x) | 0.5 M |\n" * 400  # > 8000
    publish_front(tracking, "smoke", "smoke: 400 of 400", table, ["val_accuracy", "macs"], ["k"])

    tags = tracking.client.get_experiment(tracking.experiment_id).tags
    envelope = json.loads(tags[f"{VIEW_TAG}front-{parent}"])
    assert envelope["name"] == f"Pareto front of smoke ({parent[:8]})"
    assert isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])  # the UI's view: a JSON string in the envelope
    assert state["searchFilter"] == (
        f"tags.pareto = \"true\" and tags.mlflow.parentRunId = '{parent}'"
    )
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`macs`", True)
    assert state["selectedColumns"] == [
        "metrics.`val_accuracy`",
        "metrics.`macs`",
        "metrics.`params`",
        "params.`k`",
        "tags.`registered_alias`",
    ]
    note = tracking.client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.startswith(
        "smoke: 400 of 400\n\n[The front's runs]"
        f"(#/experiments/{tracking.experiment_id}/runs?viewStateShareKey=front-{parent})"
    )
    assert len(note) <= 8000 and note.endswith("the whole table is the run's artifact `pareto.md`)")


def test_the_printed_link_opens_the_saved_view():
    assert front_link("http://u:pw@host:5000/", "3", "abc") == (
        "MLflow runs on the front: http://u:***@host:5000/#/experiments/3/runs?"
        "viewStateShareKey=front-abc"
    )
    assert front_link("sqlite:////data/mlflow.db", "3", "abc") == (
        "MLflow runs on the front: `mlflow ui --backend-store-uri sqlite:////data/mlflow.db`, "
        "then http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=front-abc"
    )
