from __future__ import annotations

import math

import pytest
import torch

import dgc
from dgc.layers.dgc_kernels import DgcKernels
from tests.helpers import graph_counter
from trainables.config import DistillParams
from trainables.config import OptimParams
from trainables.config import TrialConfig
from trainables.loop import Criterion
from trainables.loop import NonFiniteLossError
from trainables.loop import Schedule
from trainables.loop import make_optimizer
from trainables.loop import recalibrate_bn
from trainables.loop import train_one_epoch


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


def test_nan_loss_stops_with_a_clear_error():
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1)
    batches = [(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))]
    sched = Schedule(OptimParams(), 1, 1)
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan by iteration 1"):
        train_one_epoch(model, batches, make_optimizer(model, sched.optim), sched, 0)


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
    sched = Schedule(OptimParams(lr=0.01), 8, 3, gate=gate.gate_schedule.resolve(3))
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


def test_finetune_lr_restarts_low_at_the_ramp_end_and_decays_to_zero():
    optim = OptimParams(lr=0.1, finetune_lr=0.2)
    sched = Schedule(optim, 10, 10, gate=dgc.GateSchedule(0.1, 0.5))  # the ramp ends at it=50
    plain = Schedule(OptimParams(lr=0.1), 10, 10, gate=dgc.GateSchedule(0.1, 0.5))
    assert [sched.lr(i) for i in range(50)] == [plain.lr(i) for i in range(50)]
    assert sched.lr(50) == pytest.approx(0.02)  # 0.2 * lr, then cosine over the last 50
    assert sched.lr(75) == pytest.approx(0.01)
    assert sched.lr(99) == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 49 / 50)))
    assert all(sched.lr(i) >= sched.lr(i + 1) for i in range(50, 99))


def _digits_batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]  # fmt: skip


def _step_weights(criterion: Criterion | None, teacher: torch.nn.Module | None = None) -> dict:
    torch.manual_seed(0)
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, gate_factor=0.5)
    for layer in dgc.dgc_layers(model):
        layer.kernels = DgcKernels(prefer="fold")  # comparable bit for bit
    sched = Schedule(OptimParams(lr=0.05), 3, 1)
    train_one_epoch(model, _digits_batches(), make_optimizer(model, sched.optim), sched, 0,
                    criterion=criterion)  # fmt: skip
    return model.state_dict()


def test_distillation_at_weight_zero_trains_exactly_as_without_a_teacher():
    teacher = dgc.create_model("resnet8", num_classes=10, in_chans=1)
    plain = _step_weights(None)
    zero = _step_weights(Criterion(OptimParams(lr=0.05), teacher, DistillParams(weight=0.0)))
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)
    half = _step_weights(Criterion(OptimParams(lr=0.05), teacher, DistillParams(weight=0.5)))
    assert not all(torch.equal(plain[k], half[k]) for k in plain)  # the teacher does teach


def test_the_teacher_runs_in_eval_without_grad_and_is_never_updated():
    teacher = dgc.create_model("resnet8", num_classes=10, in_chans=1).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad)))
    _step_weights(Criterion(OptimParams(lr=0.05), teacher, DistillParams(weight=0.5)))
    assert seen == [(False, False)] * 3  # every batch, in eval, no graph
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN too
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_distilling_from_a_copy_of_itself_adds_nothing_to_the_loss():
    model = dgc.create_model("resnet8", num_classes=10, in_chans=1).eval()
    twin = dgc.create_model("resnet8", num_classes=10, in_chans=1)
    twin.load_state_dict(model.state_dict())
    x, y = _digits_batches(1)[0]
    plain = Criterion(OptimParams(lasso=0.0))(model, x, y)
    kd = Criterion(OptimParams(lasso=0.0), twin, DistillParams(weight=1.0, temperature=3.0))
    assert float(kd(model, x, y)) == pytest.approx(0.0, abs=1e-6)  # KL of equal logits
    half = Criterion(OptimParams(lasso=0.0), twin, DistillParams(weight=0.5))(model, x, y)
    assert float(half) == pytest.approx(0.5 * float(plain), rel=1e-5)


def test_recalibrated_batchnorm_holds_the_plain_average_of_the_batches_statistics():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    model[0].running_mean.fill_(5.0)  # stale statistics of an earlier network
    batches = [(torch.randn(4, 3, 5, 5) + i, torch.zeros(4)) for i in range(3)]
    assert recalibrate_bn(model, iter(batches), 2) == 2
    expected = torch.stack([x.mean((0, 2, 3)) for x, _ in batches[:2]]).mean(0)
    torch.testing.assert_close(model[0].running_mean, expected)
    assert model[0].momentum == 0.1  # restored


def test_a_compiled_dgc_network_trains_through_the_pruning_ramp_without_recompiling():
    # torch.compile as trial.compile uses it, with a backend that only counts the graphs: the
    # kept count moves at every iteration of the ramp, and the graphs must not follow it.
    graphs, backend = graph_counter()
    torch.manual_seed(0)
    model = dgc.create_model("dyresnet8", num_classes=10, in_chans=1, gate_factor=0.25)
    step_model = torch.compile(model, backend=backend)
    sched = Schedule(OptimParams(lr=0.01), 6, 1, gate=dgc.GateSchedule(0.0, 1.0))
    layer = dgc.dgc_layers(model)[-1]
    counts = {dgc.inactive_channels(sched.progress(i), layer.in_channels, 0.25, sched.gate)
              for i in range(6)}  # fmt: skip
    stats = train_one_epoch(step_model, _digits_batches(6), make_optimizer(model, sched.optim),
                            sched, 0)  # fmt: skip
    assert len(counts) >= 4 and math.isfinite(stats.loss)  # the count moved at every step
    assert len(graphs) <= 2
