"""YAML loading (safe_load) and ``--set key=value`` overrides applied before validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spaces.convert import set_dotted


class SearchConfigError(ValueError):
    """A user-facing configuration problem; the message names file, field, value and fix."""


MAX_FILE_BYTES = 1 << 20  # an experiment or space file is a few hundred bytes
MAX_NODES = 100_000  # values after alias expansion: stops "billion laughs" anchor bombs


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SearchConfigError(f"{p}: no such file")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise SearchConfigError(
            f"{p}: {p.stat().st_size} bytes; an experiment file is at most {MAX_FILE_BYTES} bytes"
        )
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SearchConfigError(
            f"{p}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 YAML"
        ) from err
    doc = safe_yaml(text, str(p))
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


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with its errors (tags such as !!python/object included) as
    SearchConfigError, and a bound on the values that aliases expand to."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SearchConfigError(f"{where}: not valid YAML: {str(err)[:500]}") from err
    if _count_nodes(doc, MAX_NODES) > MAX_NODES:
        raise SearchConfigError(
            f"{where}: expands to more than {MAX_NODES} values (nested YAML anchors/aliases); "
            "write the settings out"
        )
    return doc


def _count_nodes(doc: Any, limit: int) -> int:
    """Values in ``doc`` counting shared (aliased) ones each time; stops past ``limit``."""
    count, stack = 0, [doc]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count
