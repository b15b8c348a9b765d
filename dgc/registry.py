"""Model registry: ``create_model(name, **kwargs)`` and ``list_models(pattern)``, timm style.

The registry is the package's one global: filled at import time, read-only afterwards.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

ModelFn = Callable[..., nn.Module]
_MODELS: dict[str, ModelFn] = {}
VARIANT_KINDS = {"": "dense", "dy": "dynamic", "gc": "group"}


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Register ``fn`` under ``name``; names are unique."""

    def wrap(fn: ModelFn) -> ModelFn:
        if name in _MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def register_family(name: str) -> Callable[[ModelFn], ModelFn]:
    """Register a network family as its three variants: dense ``name``, DGC ``dy<name>`` and
    static group conv ``gc<name>``. ``fn(kind, **kwargs)`` builds the variant of that kind."""

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
    import torch

    with torch.device("meta"):
        model = create_model(name)
    return int(getattr(model, "num_stages"))


def variant_of(name: str, kind: str) -> str:
    """The ``kind`` variant ("dense", "dynamic" or "group") of the family ``name`` belongs to:
    ``variant_of("dyresnet8", "group") == "gcresnet8"``.

    Raises:
        ValueError: ``name`` is not a variant of a registered family.
    """
    base = name
    for prefix in ("dy", "gc"):
        if name.startswith(prefix) and name[len(prefix) :] in _MODELS:
            base = name[len(prefix) :]
    prefix = {k: p for p, k in VARIANT_KINDS.items()}[kind]
    if not all(p + base in _MODELS for p in VARIANT_KINDS):
        raise ValueError(f"{name!r} is not part of a registered dense/dy/gc model family")
    return prefix + base


def model_kind(name: str) -> str:
    """ "dense", "dynamic" or "group" for a registered family variant name."""
    for prefix in ("dy", "gc"):
        if name.startswith(prefix) and name[len(prefix) :] in _MODELS:
            return VARIANT_KINDS[prefix]
    return "dense"
