"""The configuration error of spaces/ and search/, and pydantic validation errors turned
into one line per problem: file, field path, value, fix."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names file, field, value and fix."""


_FIXES = {
    "extra_forbidden": "remove it or check its spelling",
    "missing": "add it",
}


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        value = e.get("input")
        # A whole section failing a rule across its fields is not echoed: the message names them.
        section = isinstance(value, dict) and e["type"] == "value_error"
        shown = "" if e["type"] == "missing" or section else f" = {value!r}"
        fix = _FIXES.get(e["type"], "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        where = f"{loc}{shown}: " if loc else ""
        lines.append(f"{source}: {where}{msg}" + (f" ({fix})" if fix else ""))
    return "\n".join(lines)
