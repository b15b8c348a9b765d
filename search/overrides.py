"""YAML loading (safe_load) and ``--set key=value`` overrides applied before validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spaces.convert import set_dotted


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
        try:
            set_dotted(doc, key, yaml.safe_load(raw))
        except ValueError as err:
            raise SearchConfigError(f"{source}: --set {err}") from err
    return doc
