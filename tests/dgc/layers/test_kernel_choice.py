"""KernelChoice: times a shape once it recurs, caches, never times while a trace records."""

from __future__ import annotations

import time

import torch

from dgc.layers.kernel_choice import TIMED_RUNS
from dgc.layers.kernel_choice import KernelChoice
from dgc.layers.kernel_choice import patience


def _kernels(calls, slow_s=0.01):
    def slow():
        calls["slow"] += 1
        time.sleep(slow_s)
        return torch.zeros(1)

    def fast():
        calls["fast"] += 1
        return torch.ones(1)

    return {"slow": slow, "fast": fast}


def test_choice_is_the_fastest_and_is_made_once_per_key():
    choice, calls = KernelChoice(patience=0), {"slow": 0, "fast": 0}
    assert choice.run("a", _kernels(calls), default="slow").item() == 1.0
    assert calls == {"slow": 1 + TIMED_RUNS, "fast": 2 + TIMED_RUNS}  # warm-up + timed + run
    choice.run("a", _kernels(calls), default="slow")
    assert calls == {"slow": 1 + TIMED_RUNS, "fast": 3 + TIMED_RUNS}  # cached: no timing
    assert choice.chosen == {"a": "fast"}


def test_a_key_is_timed_only_once_its_default_ran_as_often_as_timing_costs():
    choice, calls = KernelChoice(), {"slow": 0, "fast": 0}
    wait = patience(2)
    assert wait == 2 * (1 + TIMED_RUNS)  # a warm-up and the timed runs of both kernels
    for _ in range(wait):  # a shape seen this often or less never pays for timing
        assert choice.run("a", _kernels(calls, slow_s=0.001), default="slow").item() == 0.0
    assert calls == {"slow": wait, "fast": 0} and choice.chosen == {}
    choice.run("b", _kernels(calls, slow_s=0.001), default="slow")  # keys count apart
    assert choice.seen == {"a": wait, "b": 1}
    assert choice.run("a", _kernels(calls, slow_s=0.001), default="slow").item() == 1.0
    assert choice.chosen == {"a": "fast"} and set(choice.seen) == {"b"}


def test_the_environment_turns_timing_off_or_to_the_first_call(monkeypatch):
    monkeypatch.setenv("DGC_KERNEL_TIMING", "first")  # what the benchmarks ask for
    choice, calls = KernelChoice(), {"slow": 0, "fast": 0}
    assert choice.run("a", _kernels(calls), default="slow").item() == 1.0
    assert choice.chosen == {"a": "fast"}
    monkeypatch.setenv("DGC_KERNEL_TIMING", "0")
    choice = KernelChoice()
    assert choice.run("a", _kernels(calls), default="slow").item() == 0.0
    assert choice.chosen == {"a": "slow"} and not choice.times


def test_no_measurement_takes_the_default_and_prefer_pins():
    calls = {"slow": 0, "fast": 0}
    assert KernelChoice(measure=False).run("a", _kernels(calls), "slow").item() == 0.0
    assert KernelChoice(prefer="slow").run("a", _kernels(calls), "fast").item() == 0.0
    assert calls == {"slow": 2, "fast": 0}


def test_a_trace_records_one_kernel_and_no_timing_runs():
    choice, calls = KernelChoice(patience=0), {"slow": 0, "fast": 0}
    choice.run((2, 3), _kernels(calls), default="slow")  # eager: chooses "fast" for (2, 3)
    before = dict(calls)

    class M(torch.nn.Module):
        def forward(self, x):
            k = _kernels(calls)
            return x + choice.run(tuple(x.shape), k, default="slow")

    traced = torch.jit.trace(M(), torch.zeros(2, 3), check_trace=False)
    assert calls == {"slow": before["slow"], "fast": before["fast"] + 1}
    assert traced(torch.zeros(2, 3)).sum().item() == 6.0  # the eager choice was recorded


def test_a_trace_takes_the_fastest_recordable_kernel_when_eager_chose_another():
    # Eager chose "native" (say, a ctypes kernel a trace cannot record); the trace of the same
    # shape offers only the torch kernels and must take the fastest of those, not the default.
    choice, calls = KernelChoice(patience=0), {"slow": 0, "fast": 0, "native": 0}

    def torch_kernels():
        kernels = _kernels(calls, slow_s=0.02)
        fast = kernels["fast"]
        kernels["fast"] = lambda: (time.sleep(0.004), fast())[1]
        return kernels

    def native():
        calls["native"] += 1
        return torch.full((1,), 2.0)

    choice.run((2, 3), {**torch_kernels(), "native": native}, default="slow")
    assert choice.chosen[(2, 3)] == "native"

    class M(torch.nn.Module):
        def forward(self, x):
            return x + choice.run(tuple(x.shape), torch_kernels(), default="slow")

    traced = torch.jit.trace(M(), torch.zeros(2, 3), check_trace=False)
    assert traced(torch.zeros(2, 3)).sum().item() == 6.0  # "fast", timed faster than "slow"


def test_excluded_kernels_are_never_timed_nor_run():
    choice, calls = KernelChoice(exclude=("fast",)), {"slow": 0, "fast": 0}
    assert choice.run("a", _kernels(calls), default="fast").item() == 0.0
    assert calls["fast"] == 0 and choice.chosen == {"a": "slow"}
    assert choice.known("a", ("slow", "fast")) == "slow"
    assert KernelChoice(prefer="fast", exclude=("fast",)).known("a", ("fast",)) is None


def test_deterministic_algorithms_take_the_default_without_timing():
    calls = {"slow": 0, "fast": 0}
    torch.use_deterministic_algorithms(True)
    try:
        choice = KernelChoice()
        assert choice.run("a", _kernels(calls), default="slow").item() == 0.0
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == {"slow": 1, "fast": 0} and choice.chosen == {"a": "slow"}


def test_a_dispatch_mode_sees_one_kernel_run_and_nothing_is_settled():
    # FlopCounterMode counts the operators that run: timing runs would be counted too.
    from torch.utils.flop_counter import FlopCounterMode

    choice, calls = KernelChoice(patience=0), {"slow": 0, "fast": 0}
    with FlopCounterMode(display=False):
        choice.run("a", _kernels(calls), default="slow")
    assert calls == {"slow": 1, "fast": 0} and choice.chosen == {}
    choice.run("a", _kernels(calls), default="slow")  # eager again: timed, settled
    assert choice.chosen == {"a": "fast"}
    with FlopCounterMode(display=False):  # the fastest timed one that is a candidate
        choice.run("a", {"slow": _kernels(calls)["slow"]}, default="slow")
    assert choice.last == "slow" and choice.chosen == {"a": "fast"}
