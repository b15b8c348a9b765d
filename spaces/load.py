"""``load_space(path)``: a space YAML, validated; errors name the file and the field path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from spaces.errors import ConfigError
from spaces.errors import format_validation_error
from spaces.schema import SearchSpace
from spaces.yaml_file import read_yaml


class SpaceError(ConfigError):
    """An invalid search space; the message names file, field, value and the rule."""


def builtin_spaces() -> list[str]:
    """Names of the ready-made spaces shipped with the package (``spaces/*.yaml``)."""
    return sorted(p.name for p in resources.files("spaces").iterdir() if p.name.endswith(".yaml"))


def resolve_space_path(ref: str, relative_to: Path | None = None) -> Path:
    """A path as given, relative to the experiment file, or a built-in space name."""
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.append(relative_to / ref)
    candidates.append(Path(str(resources.files("spaces").joinpath(Path(ref).name))))
    for c in candidates:
        if c.is_file():
            return c
    raise SpaceError(
        f"space file {ref!r} not found (looked in {', '.join(map(str, candidates))}); "
        f"built-in spaces: {', '.join(builtin_spaces())}"
    )


def parse_space(doc: Any, source: str) -> SearchSpace:
    try:
        return SearchSpace.model_validate(doc)
    except ValidationError as err:
        raise SpaceError(format_validation_error(err, source)) from err


def load_space(path: str | Path) -> SearchSpace:
    """The space in the file at ``path``, read as experiment files are (spaces.yaml_file:
    size and alias limits, no tags that build objects)."""
    try:
        doc = read_yaml(path, "space")
    except ConfigError as err:
        raise SpaceError(str(err)) from err
    return parse_space(doc, str(path))
