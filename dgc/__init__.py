"""dgc: Dynamic Group Convolution, SG-CNN and DyNet layers, networks and cost accounting
(depends on torch only).

Front doors: ``create_model(name, **kwargs)``, ``list_models()``, ``count_cost(model, size)``
(of a model built under ``on_meta()``: no weights), ``set_progress(model, p)``,
``aux_loss(model)``, and ``ShippedModel`` (the eval model as one operator, for
``torch.export``: what search logs to MLflow).
"""

from __future__ import annotations

from dgc import models as _models  # noqa: F401  (registers the recipes)
from dgc.cost import Cost
from dgc.cost import count_cost
from dgc.cost import on_meta
from dgc.layers import DynamicGroupConv2d
from dgc.layers import DynamicKernelConv2d
from dgc.layers import GateSchedule
from dgc.layers import SelfGroupingConv2d
from dgc.layers import inactive_channels
from dgc.ops import aux_loss
from dgc.ops import dgc_layers
from dgc.ops import kernel_choices
from dgc.ops import load_dense_weights
from dgc.ops import set_kernel_choices
from dgc.ops import set_kernel_patience
from dgc.ops import set_progress
from dgc.ops import sg_layers
from dgc.program import ShippedModel
from dgc.registry import create_model
from dgc.registry import list_models
from dgc.registry import model_kind
from dgc.registry import num_stages
from dgc.registry import variant_of

__all__ = [
    "Cost",
    "DynamicGroupConv2d",
    "DynamicKernelConv2d",
    "GateSchedule",
    "SelfGroupingConv2d",
    "ShippedModel",
    "aux_loss",
    "count_cost",
    "create_model",
    "dgc_layers",
    "inactive_channels",
    "kernel_choices",
    "list_models",
    "load_dense_weights",
    "on_meta",
    "model_kind",
    "num_stages",
    "set_kernel_choices",
    "set_kernel_patience",
    "set_progress",
    "sg_layers",
    "variant_of",
]
