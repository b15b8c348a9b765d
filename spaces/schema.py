"""Search-space schema: float / int / categorical parameters over dotted TrialConfig paths."""

from __future__ import annotations

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


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> FloatParam:
        _check_bounds(self.low, self.high, self.log)
        return self


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> IntParam:
        _check_bounds(self.low, self.high, self.log)
        return self


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _check_bounds(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low={low} > high={high}; swap them")
    if log and low <= 0:
        raise ValueError(f"log=true needs low > 0, got low={low}")


class SearchSpace(BaseModel):
    """``params`` maps dotted TrialConfig paths (``model.heads``, ``optim.lr``) to parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    params: dict[str, Param] = Field(min_length=1)
