from __future__ import annotations

import math

import pytest
import torch

import dgc
from trainables import metrics as M
from trainables.config import OptimParams
from trainables.config import TrialConfig
from trainables.loop import NonFiniteLossError
from trainables.loop import Schedule
from trainables.loop import make_optimizer
from trainables.loop import train_one_epoch
from trainables.runner import load_state
from trainables.runner import measure_latency
from trainables.runner import run_trial
from trainables.runner import save_state


class Collect:
    def __init__(self) -> None:
        self.metrics, self.states = [], []

    def report(self, metrics, state):
        self.metrics.append(metrics)
        self.states.append(state)


def _cfg(**kw) -> TrialConfig:
    base = {
        "epochs": 3,
        "seed": 7,
        "model": {"name": "dyresnet8", "gate_factor": 0.5},
        "optim": {"lr": 0.05},
        "data": {"batch_size": 64, "val_size": 300},
    }
    base.update(kw)
    return TrialConfig.model_validate(base)


def test_schedule_is_per_iteration_cosine_and_progress():
    s = Schedule(OptimParams(lr=0.1), iters_per_epoch=10, epochs=3)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(15) == pytest.approx(0.05)
    assert s.lr(29) == pytest.approx(0.05 * (1 + math.cos(math.pi * 29 / 30)))
    assert s.progress(0) == 0 and s.progress(15) == 0.5
    warm = Schedule(OptimParams(lr=0.1, warmup_epochs=1), 10, 3)
    assert warm.lr(0) == pytest.approx(0.01 * 0.5 * (1 + math.cos(0)))
    multi = Schedule(OptimParams(lr=0.1, schedule="multistep"), 10, 4)
    assert [round(multi.lr(i), 6) for i in (0, 20, 30)] == [0.1, 0.01, 0.001]


def test_multistep_decays_at_epoch_boundaries_with_the_authors_defaults():
    # 3 epochs: the authors decay when epoch >= 1.5 (the start of epoch 2) and >= 2.25 (epoch 3,
    # past the end); never in the middle of an epoch (iteration 15 is half-way through epoch 1).
    s = Schedule(OptimParams(lr=0.1, schedule="multistep"), 10, 3)
    assert s.milestones == (2, 3)
    assert [round(s.lr(i), 6) for i in (14, 15, 19, 20)] == [0.1, 0.1, 0.1, 0.01]
    assert Schedule(OptimParams(schedule="multistep"), 10, 90, "imagenet").milestones == (30, 60)
    custom = Schedule(
        OptimParams(lr=1.0, schedule="multistep", milestones=[1, 3], gamma=0.5), 10, 4
    )
    assert [custom.lr(i) for i in (9, 10, 29, 30)] == [1.0, 0.5, 0.5, 0.25]


def test_milestones_must_increase():
    with pytest.raises(ValueError, match=r"milestones=\[3, 2\] must be strictly increasing"):
        OptimParams(milestones=[3, 2])


def test_gate_schedule_advances_every_iteration():
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, gate_factor=0.25)
    layer = dgc.dgc_layers(model)[-1]
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.n_inactive))
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(12)]
    sched = Schedule(OptimParams(lr=0.01), iters_per_epoch=12, epochs=1)
    stats = train_one_epoch(model, batches, make_optimizer(model, sched.optim), sched, 0)
    expected = [dgc.inactive_channels(i / 12, layer.in_channels, 0.25) for i in range(12)]
    assert seen == expected and len(set(seen)) > 4
    assert stats.iteration == 12 and stats.progress == 1.0


def test_tiny_dgc_network_learns_digits():
    out = Collect()
    final = run_trial(_cfg(epochs=4), out)
    assert [m[M.EPOCH] for m in out.metrics] == [1, 2, 3, 4]
    assert final[M.VAL_ACCURACY] > 0.6  # chance is 0.1
    assert M.TEST_ACCURACY in final and M.TEST_ACCURACY not in out.metrics[0]
    for m in out.metrics:  # every report carries the objectives
        assert m[M.MACS] > 0 and m[M.PARAMS] > 0 and m[M.IMAGES_PER_S] > 0
    assert out.metrics[-1][M.GATE_PROGRESS] == 1.0


@pytest.fixture
def deterministic():
    """Two runs compared bit for bit: each layer's kernel choice is timed per instance unless
    deterministic algorithms are asked for (dgc.layers.kernel_choice)."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_resume_from_checkpoint_ends_with_identical_weights(tmp_path, deterministic):
    full = Collect()
    run_trial(_cfg(), full)

    class Interrupt(Collect):
        def report(self, metrics, state):
            super().report(metrics, state)
            if metrics[M.EPOCH] == 2:
                save_state(state, tmp_path / "state.pt")
                raise KeyboardInterrupt  # the driver dies here

    with pytest.raises(KeyboardInterrupt):
        run_trial(_cfg(), Interrupt())
    resumed = Collect()
    run_trial(_cfg(), resumed, resume=load_state(tmp_path / "state.pt"))
    assert [m[M.EPOCH] for m in resumed.metrics] == [3]
    a, b = full.states[-1]["model"], resumed.states[-1]["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.metrics[-1][M.VAL_ACCURACY] == resumed.metrics[-1][M.VAL_ACCURACY]


def test_checkpoint_interval_and_weights_only_loading(tmp_path):
    out = Collect()
    run_trial(_cfg(checkpoint_every=2), out)
    assert [s is not None for s in out.states] == [False, True, True]  # every 2 and the end
    save_state(out.states[-1], tmp_path / "s.pt")
    state = load_state(tmp_path / "s.pt")  # weights_only=True
    assert state["epoch"] == 3 and state["config"]["model"]["name"] == "dyresnet8"


def test_nan_loss_stops_with_a_clear_error():
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1)
    batches = [(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))]
    sched = Schedule(OptimParams(), 1, 1)
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan by iteration 1"):
        train_one_epoch(model, batches, make_optimizer(model, sched.optim), sched, 0)


def test_latency_is_measured_once_and_carried_by_every_report():
    out = Collect()
    run_trial(_cfg(epochs=2, measure_latency=True), out)
    latencies = {m[M.LATENCY_MS] for m in out.metrics}
    assert len(latencies) == 1 and latencies.pop() > 0


def test_latency_is_timed_on_a_sealed_copy_and_leaves_the_trained_model_as_it_was(monkeypatch):
    from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
    from dgc.program import seal

    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, gate_factor=0.25)
    sealed = []  # the real seal, noting what it was given
    monkeypatch.setattr(dgc.program, "seal", lambda m: sealed.append(m) or seal(m))
    assert measure_latency(model, (1, 8, 8), torch.device("cpu"), runs=3) > 0
    (probe,) = sealed
    assert probe is not model and not probe.training
    assert all(m.sealed for m in probe.modules() if isinstance(m, DynamicGroupConv2d))
    layers = [m for m in model.modules() if isinstance(m, DynamicGroupConv2d)]
    assert model.training and not any(m.sealed or m.n_inactive for m in layers)


def test_custom_gate_schedule_reaches_target_at_its_breakpoint_and_eval_sees_it():
    # Ramp over epoch 1 of 3 (warm-up to 0.25 epoch): pruning is complete at the end of epoch 1,
    # and the validation after epoch 1 runs at the target sparsity.
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, gate_factor=0.25)
    layer = dgc.dgc_layers(model)[-1]
    target = dgc.inactive_channels(1.0, layer.in_channels, 0.25)
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.n_inactive))
    gate = TrialConfig(
        epochs=3, gate_schedule={"warmup_end": 0.25, "ramp_end": 1, "unit": "epochs"}
    )
    sched = Schedule(OptimParams(lr=0.01), 8, 3, gate_fractions=gate.gate_schedule.fractions(3))
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(8)]
    train_one_epoch(model, batches, make_optimizer(model, sched.optim), sched, 0)
    # iterations 0..7 of 24: warm-up while it/24 <= 1/12 (it <= 2), then linear to it=8
    assert seen[:3] == [0, 0, 0] and 0 < seen[3] < seen[7] < target
    assert seen == sorted(seen)
    assert layer.n_inactive == target  # left at the epoch's end for evaluation


@pytest.mark.parametrize(
    "p,expected",
    [(0.0, 0), (0.1, 0), (0.1 + 1e-9, 0), (0.3, 48), (0.5, 96), (0.5 - 1e-9, 96), (0.9, 96)],
)
def test_moved_breakpoints_at_their_boundaries(p, expected):
    # C=128, g=0.25 (target 96), warm-up to 0.1, ramp to 0.5: 96 * (p - 0.1) / 0.4
    assert dgc.inactive_channels(p, 128, 0.25, dgc.GateSchedule(0.1, 0.5)) == expected


def test_empty_ramp_prunes_at_once_and_paper_schedule_is_the_default():
    assert dgc.inactive_channels(0.0, 128, 0.25, dgc.GateSchedule(0.0, 0.0)) == 96
    for i in range(1000):  # the paper's breakpoints keep the reference code's expression
        p = i / 999
        assert (
            dgc.inactive_channels(p, 77, 0.3, dgc.GateSchedule())
            == dgc.inactive_channels(p, 77, 0.3)
            == (0 if p <= 1 / 12 else round(77 * 0.7 * min(1.5 * (p - 1 / 12), 1.0)))
        )


@pytest.mark.parametrize(
    "gate,match",
    [
        ({"warmup_end": 0.5, "ramp_end": 0.25}, "warmup_end=0.5 is after ramp_end=0.25"),
        ({"ramp_end": 1.5}, "ramp_end=1.5 is past the end of the run"),
        ({"ramp_end": 4, "unit": "epochs"}, r"ramp_end=4.0 epochs is past the end of the run"),
        ({"ramp_end": "nan"}, "ramp_end"),
        ({"ramp_end": -1}, "ramp_end"),
    ],
)
def test_bad_gate_schedules_are_refused(gate, match):
    with pytest.raises(ValueError, match=match):
        TrialConfig(epochs=3, gate_schedule=gate)
    with pytest.raises(ValueError, match="need 0 <= warmup_end <= ramp_end <= 1"):
        dgc.GateSchedule(0.5, 0.25)


def test_a_trial_starts_from_the_dense_checkpoint_it_is_given(tmp_path):
    from dgc.ops import _head_major

    dense = dgc.create_model("resnet8", num_classes=10, in_chans=1)
    save_state({"model": dense.state_dict()}, tmp_path / "dense.pt")
    out = Collect()
    # lr so small that one epoch leaves the weights where they started
    cfg = _cfg(
        epochs=1,
        init_from=str(tmp_path / "dense.pt"),
        optim={"lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0},
    )
    run_trial(cfg, out)
    start = out.states[-1]["model"]
    layer = dgc.create_model("dyresnet8", num_classes=10, in_chans=1).stages[0][0].conv1
    torch.testing.assert_close(
        start["stages.0.0.conv1.weight"], _head_major(dense.stages[0][0].conv1.weight, layer.heads)
    )
    torch.testing.assert_close(start["fc.weight"], dense.fc.weight)
    bad = _cfg(model={"name": "gcresnet8"}, init_from=str(tmp_path / "dense.pt"))
    with pytest.raises(ValueError, match=r"init_from=.*dense.pt: .* other shapes"):
        run_trial(bad, Collect())


def test_pretrain_epochs_train_the_dense_network_first_within_the_budget(caplog):
    import logging

    out = Collect()
    with caplog.at_level(logging.INFO, logger="trainables.runner"):
        final = run_trial(_cfg(epochs=3, pretrain_epochs=1), out)
    assert "pretraining resnet8 for 1 epochs" in caplog.text
    assert [m[M.EPOCH] for m in out.metrics] == [2, 3]  # DGC's own epochs, counted in the 3
    assert out.metrics[-1][M.GATE_PROGRESS] == 1.0 and final[M.MACS] == 414330
    # The static baseline has no dense start: it trains the whole budget itself.
    gc = Collect()
    run_trial(_cfg(epochs=3, pretrain_epochs=1, model={"name": "gcresnet8"}), gc)
    assert [m[M.EPOCH] for m in gc.metrics] == [1, 2, 3]


def test_a_resumed_pretrained_trial_does_not_pretrain_again(caplog, tmp_path):
    import logging

    class Snapshot(Collect):  # a state_dict holds live tensors: save it when it is reported
        def report(self, metrics, state):
            super().report(metrics, state)
            if metrics[M.EPOCH] == 2:
                save_state(state, tmp_path / "state.pt")

    first = Snapshot()
    run_trial(_cfg(epochs=3, pretrain_epochs=1), first)
    state = load_state(tmp_path / "state.pt")  # after epoch 2
    assert any(state["kernels"].values())  # the timed kernel choices, resumed as they were
    again = Collect()
    with caplog.at_level(logging.INFO, logger="trainables.runner"):
        final = run_trial(_cfg(epochs=3, pretrain_epochs=1), again, resume=state)
    assert "pretraining" not in caplog.text and [m[M.EPOCH] for m in again.metrics] == [3]
    assert final[M.VAL_ACCURACY] == first.metrics[-1][M.VAL_ACCURACY]


def test_pretrain_epochs_must_leave_epochs_to_train():
    with pytest.raises(ValueError, match="pretrain_epochs=3 leaves no epoch of epochs=3"):
        _cfg(epochs=3, pretrain_epochs=3)
    with pytest.raises(
        ValueError, match=r"ramp_end=3.0 epochs is past the end .*pretrain_epochs=1"
    ):
        _cfg(epochs=3, pretrain_epochs=1, gate_schedule={"ramp_end": 3, "unit": "epochs"})
