"""Search-space schema: float / int / categorical parameters over dotted TrialConfig paths."""

from __future__ import annotations

import math
from typing import Annotated
from typing import Any
from typing import Literal

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import model_validator


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: one independent parameter per stage of the model family (e.g. per-stage gate factors);
    #: the sampled values form the list the model receives.
    per_stage: bool = False
    #: conditional parameter: sampled (define-by-run) only when each named categorical
    #: parameter, listed earlier in the space, took one of the given values, e.g.
    #: ``when: {model.name: [sgresnet20]}``; otherwise left unset (the recipe's default).
    when: dict[str, list[Any]] | None = None


class _Numeric(_Param):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> _Numeric:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low={self.low}, high={self.high}: bounds must be finite numbers")
        if self.low > self.high:
            raise ValueError(f"low={self.low} > high={self.high}; swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got low={self.low}")
        return self


class FloatParam(_Numeric):
    type: Literal["float"]
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _log_or_step(self) -> FloatParam:
        if self.log and self.step is not None:
            raise ValueError(f"log=true and step={self.step} cannot be combined; drop one")
        return self


class IntParam(_Numeric):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _log_or_step(self) -> IntParam:
        if self.log and self.step != 1:
            raise ValueError(f"log=true and step={self.step} cannot be combined; drop one")
        return self


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class SearchSpace(BaseModel):
    """``params`` maps dotted TrialConfig paths (``model.heads``, ``optim.lr``) to parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    params: dict[str, Param] = Field(min_length=1)

    @model_validator(mode="after")
    def _conditions(self) -> SearchSpace:
        earlier: dict[str, Any] = {}
        for key, p in self.params.items():
            for parent, values in (p.when or {}).items():
                _check_condition(key, parent, values, earlier.get(parent))
            earlier[key] = p
        return self


def _check_condition(key: str, parent: str, values: list[Any], p: Any) -> None:
    where = f"params.{key}.when.{parent}"
    if p is None:
        raise ValueError(
            f"{where}: {parent!r} is not a parameter listed before {key!r}; a condition "
            "names an earlier categorical parameter of the space"
        )
    if not isinstance(p, CategoricalParam) or p.per_stage:
        raise ValueError(f"{where}: {parent!r} must be a categorical parameter (not per stage)")
    unknown = [v for v in values if v not in p.choices]
    if not values or unknown:
        raise ValueError(
            f"{where}: {unknown or values!r} must be a non-empty list of choices of {parent!r} "
            f"({p.choices!r})"
        )


def is_active(p: Any, values: dict[str, Any]) -> bool:
    """Whether a parameter is sampled, given the values (by key) sampled before it."""
    return all(values.get(k) in allowed for k, allowed in (p.when or {}).items())
