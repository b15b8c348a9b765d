from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainables.config import TrialConfig


def test_defaults_are_the_papers_recipe():
    o = TrialConfig().optim
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.lasso, o.schedule) == (
        0.1,
        0.9,
        True,
        1e-4,
        1e-5,
        "cosine",
    )


def test_unknown_keys_rejected_at_every_level():
    for bad in ({"epoch": 3}, {"optim": {"learning_rate": 0.1}}, {"model": {"head": 4}}):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            TrialConfig.model_validate(bad)


def test_types_are_coerced_and_checked():
    cfg = TrialConfig.model_validate({"epochs": "3", "model": {"heads": [2, 4, 4]}})
    assert cfg.epochs == 3 and cfg.model.heads == [2, 4, 4]
    with pytest.raises(ValidationError):
        TrialConfig.model_validate({"epochs": "three"})
    with pytest.raises(ValidationError, match="data.datadir"):
        TrialConfig.model_validate({"data": {"dataset": "cifar10"}})
