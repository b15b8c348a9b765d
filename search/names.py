"""Names shared between the modules of search/ (MLflow tag keys, Optuna attributes), each
defined once. File names of trainables live there (``trainables.runner.STATE_FILE``)."""

from __future__ import annotations

SEARCH_DIR_TAG = "search_dir"  # parent run: the search folder
KIND_TAG = "dgc_search.kind"  # parent run: "search"
TRIAL_TAG = "ray_trial_id"  # child run tag and Optuna user attribute: Tune's trial id
OPTUNA_TRIAL_TAG = "optuna_trial"  # child run tag and trial-config tag: Optuna trial number
STATUS_TAG = "status"
ERROR_TAG = "error"
CHECKPOINT_TAG = "checkpoint"
MODEL_URI_TAG = "model_uri"
PARETO_TAG = "pareto"
PARETO_RANK_TAG = "pareto_rank"
REGISTERED_VERSION_TAG = "registered_version"
REGISTERED_ALIAS_TAG = "registered_alias"
STOPPED_TAG = "stopped_at_epoch"  # child run tag, Optuna user attribute: early-stopped trial
REFERENCE_TAG = "reference"  # trial-config tag, child run tag, Optuna user attribute: its label
PRETRAIN_TAG = "pretrain"  # trial-config tag, child run tag: the search's pretrained network
OPERATOR_TAG = "operator"  # child run tag: the model's operator kind (dgc.model_kind)
LABEL_ATTR = "label"  # Optuna user attribute: the trial's label (trial_label)
MLFLOW_RUN_ATTR = "mlflow_run_id"  # Optuna user attribute: the trial's MLflow child run
# Optuna user attributes of the points the searcher costs and never hands to Tune:
OVER_BUDGET_ATTR = "over_budget"  # PRUNED: its MACs are over budget.macs (True)
INVALID_ATTR = "invalid"  # FAIL: it cannot be built (the first line of the error)
DUPLICATE_OF_ATTR = "duplicate_of"  # FAIL: the number of the study's trial at the same point
JOB_NAME_KEY = "job_name"  # Ray job metadata: the name the dashboard's Jobs page shows


def trial_label(tags: dict) -> str:
    """A trial's name everywhere a person meets it (MLflow run name, Optuna user attribute,
    Ray actor, progress line): ``trial-<Optuna number>``, ``ref-dense``, ``ref-group-0.25``,
    ``pretrain-dense``; from the ``tags`` of its trial config."""
    if tags.get(PRETRAIN_TAG):
        return "pretrain-dense"
    if tags.get(REFERENCE_TAG):
        return f"ref-{tags[REFERENCE_TAG]}"
    return f"trial-{tags.get(OPTUNA_TRIAL_TAG, '')}"
