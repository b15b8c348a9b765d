"""Metric names: the single source of truth for reports, objectives and MLflow keys."""

from __future__ import annotations

VAL_ACCURACY = "val_accuracy"
VAL_LOSS = "val_loss"
TRAIN_LOSS = "train_loss"
TEST_ACCURACY = "test_accuracy"
TEST_LOSS = "test_loss"
MACS = "macs"
#: SG-CNN models: MACs at the target compression, known before training (the budget's); their
#: ``macs`` become the realised count once the last self-grouping step has run
TARGET_MACS = "target_macs"
PARAMS = "params"
LATENCY_MS = "latency_ms"
EPOCH = "epoch"
EPOCH_TIME_S = "epoch_time_s"
IMAGES_PER_S = "images_per_s"
GATE_PROGRESS = "gate_progress"
NODE_ID = "node_id"  # the Ray node that trained the trial
#: a trial given a fraction of a GPU caps its memory at that fraction of the device's
GPU_MEMORY_FRACTION = "gpu_memory_fraction"
#: a deterministic failure (a non-finite loss), reported as the trial's last result instead of
#: raised, so that Tune neither retries it (max_failures) nor reruns it on resume; its
#: traceback travels as TRIAL_ERROR_TEXT.
TRIAL_ERROR = "trial_error"
TRIAL_ERROR_TEXT = "trial_error_text"
#: True on the report of a trial resumed from its last checkpoint (Tune's saved state was
#: older: a killed driver, a state put back after a full disk): its last epoch's metrics again,
#: so that Tune ends the trial with them; the tracking has them already.
FINAL_REPEAT = "final_repeat"

#: metrics an experiment may use as objectives, with their natural direction.
OBJECTIVES = {VAL_ACCURACY: "max", VAL_LOSS: "min", MACS: "min", PARAMS: "min", LATENCY_MS: "min"}
