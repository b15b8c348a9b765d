"""Fixtures of the dgc/ tests."""

from __future__ import annotations

import collections
import functools

import pytest

from dgc.layers import native

#: the native entry points the layers call, by the name a test asserts on
NATIVE_CALLS = (
    "direct_conv", "select_channels", "wgrad_weight", "igrad_planes", "igrad_fused",
    "bn_relu_train", "bn_relu_train_backward", "avg_pool2",
)  # fmt: skip


@pytest.fixture
def native_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts the calls into the native library during a test, by kernel (the names above, and
    "fused_eval" and "group_conv_eval" for the plans' calls), so that an equivalence test can
    assert that the native kernel ran rather than a silent fallback to torch's."""
    calls: collections.Counter = collections.Counter()

    def counted(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in NATIVE_CALLS:
        monkeypatch.setattr(native, name, counted(name, getattr(native, name)))
    monkeypatch.setattr(
        native.FusedPlan, "__call__", counted("fused_eval", native.FusedPlan.__call__)
    )
    monkeypatch.setattr(
        native.GroupConvPlan, "__call__", counted("group_conv_eval", native.GroupConvPlan.__call__)
    )
    return calls
