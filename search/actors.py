"""The Tune trainable class of a search, whose Ray actors the dashboard lists by trial.

Tune runs a function trainable in actors of a class ``ImplicitFunc`` whose repr is the
function's name, so the dashboard's Actors page showed every trial as ``ImplicitFunc`` /
``train_dgc``. Ray records an actor's ``repr`` once its constructor has run and shows it in the
page's Repr column: here the trial's label and Tune id, ``trial-3 (1a2b3c4d)``, ``ref-dense
(...)``, the names its MLflow run and Optuna trial carry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from search import names as N


def trial_class(fn: Callable[..., Any]) -> type:
    """Tune's trainable class for the function trainable ``fn`` (already given its resources
    and parameters with ``tune.with_resources`` / ``tune.with_parameters``); its actors' repr
    names the trial. Its Tune name stays ``fn``'s (``train_dgc``): Tune restores a search only
    with a trainable of the name it was launched with."""
    from ray.tune.trainable.function_trainable import wrap_function

    base: Any = wrap_function(fn)

    class SearchTrial(base):
        def __repr__(self) -> str:
            return actor_repr(self.config, self.trial_id)

    SearchTrial.__qualname__ = SearchTrial.__name__  # the Actors page's Class column
    return SearchTrial


def actor_repr(config: dict[str, Any], trial_id: str) -> str:
    """``trial-3 (1a2b3c4d)``: the trial's label and its Tune trial id."""
    return f"{N.trial_label(config.get('tags') or {})} ({trial_id})"
