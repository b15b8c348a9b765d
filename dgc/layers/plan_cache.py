"""A value derived from tensors (a native call's plan, a weight in another layout, packed
kernels), cached per key and rebuilt when one of the tensors it was built from changes.

A tensor "changes" when it is written in place (its version counter moves: an optimizer step,
``load_state_dict``, ``copy_``) or replaced (another storage: ``.to()``, ``assign=True`` loads).
The DGC layer, SG-CNN's layer and the DenseNets' group conv keep their eval plans here.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Iterable
from typing import Any
from typing import TypeVar

from torch import Tensor

T = TypeVar("T")


def versions(tensors: list[Tensor]) -> list[int]:
    """The tensors' version counters (bumped by every in-place write), -1 for an inference
    tensor (made under ``torch.inference_mode``), which has none: treated as never changing."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return [-1 if t.is_inference() else t._version for t in tensors]


def stamp(tensors: list[Tensor]) -> tuple:
    """What identifies the state of ``tensors``: their versions and storages (a new dtype or
    device is a new storage)."""
    return tuple(versions(tensors) + [t.data_ptr() for t in tensors])


class PlanCache:
    """Values per key, each valid while the tensors it was built from are unchanged.

    Copies and unpickled copies start empty: a plan may point into its owner's tensors (a
    ``deepcopy`` or a pickle of a model that ran eval must work, e.g. for Ray).
    """

    def __init__(self) -> None:
        self._plans: dict[Hashable, tuple[tuple, Any]] = {}

    def get(
        self,
        key: Hashable,
        sources: Callable[[], Iterable[Tensor | None]],
        build: Callable[[], T | None],
        sealed: bool = False,
    ) -> T | None:
        """The value for ``key``, built again (``build()``) when a tensor of ``sources()``
        changed; a ``build`` that returns None caches nothing. ``sealed``: the owner's tensors
        never change (``dgc.program.seal``), so a cached value is returned unchecked."""
        cached = self._plans.get(key)
        if sealed and cached is not None:
            return cached[1]
        state = stamp([t for t in sources() if t is not None])
        if cached is not None and cached[0] == state:
            return cached[1]
        value = build()
        if value is not None:
            self._plans[key] = (state, value)
        return value

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)

    def __getstate__(self) -> dict:
        return {"_plans": {}}
