"""The one bounded YAML reader for every file a user writes: experiment files, space files and
``--set`` values. ``yaml.safe_load`` (no tags that build objects), a size limit on files and a
limit on the values that anchors and aliases expand to; every refusal is a ``ConfigError``
that names the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spaces.errors import ConfigError

MAX_FILE_BYTES = 1 << 20  # an experiment or space file is a few hundred bytes
MAX_NODES = 100_000  # values after alias expansion: stops "billion laughs" anchor bombs


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in the file at ``path``, a ``what`` file (for the messages)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{p}: {size} bytes; {what} files are at most {MAX_FILE_BYTES} bytes")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{p}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 YAML"
        ) from err
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the {what} file: {err}") from err
    return safe_yaml(text, str(p))


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with its errors (tags such as !!python/object included) as
    ConfigError, and a bound on the values that aliases expand to."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {str(err)[:500]}") from err
    if _count_nodes(doc, MAX_NODES) > MAX_NODES:
        raise ConfigError(
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
