"""Experiment files read (through the bounded YAML reader of spaces.yaml_file) and
``--set key=value`` overrides applied before validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spaces.convert import set_dotted
from spaces.errors import ConfigError
from spaces.yaml_file import read_yaml
from spaces.yaml_file import safe_yaml

#: search's name for the configuration error that spaces/ and search/ share
SearchConfigError = ConfigError


def load_yaml(path: str | Path) -> dict[str, Any]:
    """An experiment file's settings (a mapping)."""
    p = Path(path)
    doc = read_yaml(p, "experiment")
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
        value = safe_yaml(raw, f"--set {key}")
        try:
            set_dotted(doc, key, value)
        except ValueError as err:
            raise SearchConfigError(f"{source}: --set {err}") from err
    return doc
