"""What a person opens in the MLflow UI to choose a model: a saved view of the search's front
and the parent run's description.

MLflow 3.17's UI keeps a runs view (filter, sort, columns) in an experiment tag
``mlflow.sharedViewState.<key>``, the same that its "Views" menu writes: an envelope
``{name, createdAt, updatedAt, state}`` whose ``state`` is the view as JSON, opened by
``#/experiments/<id>/runs?viewStateShareKey=<key>``. The URL's own parameters (``searchFilter``,
``orderByKey``) cannot choose columns, and a filter sorted by start time shows the matching
children collapsed under their parent run: sorted by MACs, the UI fetches no parent and lists
the front's runs flat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from urllib.parse import quote

from search import names as N
from search.redact import redact
from search.tracking import Tracking
from trainables import metrics as M

VIEW_TAG = "mlflow.sharedViewState."
VIEW_URL = "#/experiments/{experiment}/runs?viewStateShareKey={key}"
NOTE_TAG = "mlflow.note.content"  # a run's description, rendered as markdown


def view_key(parent_run_id: str) -> str:
    """The saved view of one search's front (one per parent run: searches share experiments)."""
    return f"front-{parent_run_id}"


def view_path(experiment_id: str, parent_run_id: str) -> str:
    """The UI route of the front's view, relative to the server's root page."""
    return VIEW_URL.format(experiment=experiment_id, key=quote(view_key(parent_run_id)))


def front_view_state(
    parent_run_id: str, objectives: Sequence[str], space_keys: Sequence[str]
) -> dict:
    """The runs view of the front: the search's runs tagged ``pareto=true``, sorted by MACs,
    with the objectives, parameters (the count) and sampled settings as columns."""
    metrics = list(dict.fromkeys([*objectives, M.MACS, M.PARAMS]))
    return {
        "searchFilter": f'tags.{N.PARETO_TAG} = "true" and '
        f"tags.mlflow.parentRunId = '{parent_run_id}'",
        "orderByKey": f"metrics.`{M.MACS}`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "selectedColumns": [
            *(f"metrics.`{m}`" for m in metrics),
            *(f"params.`{k}`" for k in space_keys),
            f"tags.`{N.REGISTERED_ALIAS_TAG}`",
        ],
    }


def write_front_view(
    tracking: Tracking, name: str, objectives: Sequence[str], space_keys: Sequence[str]
) -> None:
    """Save (or refresh) the front's view in the experiment; it is listed in the UI's Views
    menu as "Pareto front of <name> (<run id's first 8 characters>)"."""
    assert tracking.parent_run_id
    state = front_view_state(tracking.parent_run_id, objectives, space_keys)
    now = int(time.time() * 1000)
    envelope = {
        "name": f"Pareto front of {name} ({tracking.parent_run_id[:8]})",
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(state),
    }
    tracking.client.set_experiment_tag(
        tracking.experiment_id, VIEW_TAG + view_key(tracking.parent_run_id), json.dumps(envelope)
    )


def front_link(uri: str, experiment_id: str, parent_run_id: str) -> str:
    """Where to see the front in the MLflow UI: the server's page, or for a local store the
    command that serves it and the page to open."""
    view = view_path(experiment_id, parent_run_id)
    if uri.startswith(("http://", "https://")):
        return f"MLflow runs on the front: {redact(uri.rstrip('/'))}/{view}"
    return (
        f"MLflow runs on the front: `mlflow ui --backend-store-uri {redact(uri)}`, then "
        f"http://127.0.0.1:5000/{view}"
    )


def describe_search(tracking: Tracking, text: str) -> None:
    """The parent run's description (markdown, on its page): ``text``, cut to MLflow's limit
    for a tag with a pointer to the whole table (``pareto.md``, an artifact of the run)."""
    assert tracking.parent_run_id
    limit = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
    if len(text) > limit:
        more = "\n\n(cut here: the whole table is the run's artifact `pareto.md`)"
        text = text[: text.rfind("\n", 0, limit - len(more))] + more
    tracking.client.set_tag(tracking.parent_run_id, NOTE_TAG, text)


def publish_front(
    tracking: Tracking,
    name: str,
    title: str,
    front_md: str,
    objectives: Sequence[str],
    space_keys: Sequence[str],
) -> None:
    """The front's saved view, and the parent run's description: ``title``, the view's link and
    ``front_md`` (the table of ``pareto.md`` with links to the runs and registered versions)."""
    assert tracking.parent_run_id
    write_front_view(tracking, name, objectives, space_keys)
    view = view_path(tracking.experiment_id, tracking.parent_run_id)
    describe_search(
        tracking,
        f"{title}\n\n[The front's runs]({view}), sorted by MACs. Plots: the artifacts "
        f"`pareto.png` and `pareto.html` (hover a point for its trial and settings).\n\n"
        f"{front_md}",
    )
