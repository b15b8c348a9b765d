"""Model registry: ``create_model(name, **kwargs)`` and ``list_models(pattern)``, timm style.

The registry is the package's one global: filled at import time, read-only afterwards.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

from dgc.layers.conv import KIND_PREFIX

ModelFn = Callable[..., nn.Module]
_MODELS: dict[str, ModelFn] = {}
#: name prefix -> operator kind: dense "", DGC "dy", static group "gc", SG-CNN "sg", DyNet "dn"
VARIANT_KINDS = {prefix: kind for kind, prefix in KIND_PREFIX.items()}


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Register ``fn`` under ``name``; names are unique."""

    def wrap(fn: ModelFn) -> ModelFn:
        if name in _MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def register_family(name: str) -> Callable[[ModelFn], ModelFn]:
    """Register a network family as one variant per operator: dense ``name``, DGC
    ``dy<name>``, static group conv ``gc<name>``, SG-CNN ``sg<name>`` and DyNet ``dn<name>``.
    ``fn(kind, **kwargs)`` builds the variant of that kind."""

    def wrap(fn: ModelFn) -> ModelFn:
        for prefix, kind in VARIANT_KINDS.items():
            register_model(prefix + name)(_bind_kind(fn, kind))
        return fn

    return wrap


def _bind_kind(fn: ModelFn, kind: str) -> ModelFn:
    def build(**kwargs: object) -> nn.Module:
        return fn(kind, **kwargs)

    build.__doc__ = fn.__doc__
    return build


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model. ``None`` kwargs are dropped so configs can leave them unset.

    Raises:
        ValueError: unknown name (close matches listed) or an invalid setting for the model.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model name={name!r}{hint} (see dgc.list_models())")
    return _MODELS[name](**{k: v for k, v in kwargs.items() if v is not None})


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style pattern."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def num_stages(name: str) -> int:
    """Number of stages of a registered model (per-stage settings take this many values)."""
    from dgc.cost import on_meta

    with on_meta():
        model = create_model(name)
    return int(getattr(model, "num_stages"))


def variant_of(name: str, kind: str) -> str:
    """The ``kind`` variant (a key of ``KIND_PREFIX``) of the family ``name`` belongs to:
    ``variant_of("dyresnet8", "group") == "gcresnet8"``.

    Raises:
        ValueError: ``name`` is not a variant of a registered family.
    """
    base = name.removeprefix(KIND_PREFIX[model_kind(name)])
    if not all(p + base in _MODELS for p in VARIANT_KINDS):
        raise ValueError(f"{name!r} is not part of a registered model family (dense/dy/gc/sg/dn)")
    return KIND_PREFIX[kind] + base


def model_kind(name: str) -> str:
    """The operator kind of a registered family variant name ("dense", "dynamic", "group",
    "selfgroup" or "dynet")."""
    for prefix, kind in VARIANT_KINDS.items():
        if prefix and name.startswith(prefix) and name[len(prefix) :] in _MODELS:
            return kind
    return "dense"
