"""YAML loading (safe_load) and ``--set key=value`` overrides applied before validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class SearchConfigError(ValueError):
    """A user-facing configuration problem; the message names file, field, value and fix."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SearchConfigError(f"{p}: no such file")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SearchConfigError(f"{p}: not valid YAML: {err}") from err
    if not isinstance(doc, dict):
        raise SearchConfigError(
            f"{p}: the top level must be a mapping of settings, got {type(doc).__name__}"
        )
    return doc


def apply_overrides(doc: dict[str, Any], pairs: list[str], source: str) -> dict[str, Any]:
    """Set dotted keys (``trial.epochs=2``); values are parsed as YAML scalars/lists."""
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SearchConfigError(f"--set {pair!r}: expected key=value, e.g. trial.epochs=2")
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SearchConfigError(
                    f"{source}: --set {key}: {part!r} is a value, not a section"
                )
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return doc
