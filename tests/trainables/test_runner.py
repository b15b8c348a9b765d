"""run_trial: one trial from its config to its final metrics, without Ray: reports,
checkpoints and resume, latency, the dense start and the teacher."""

from __future__ import annotations

import json

import pytest
import torch

import dgc
from trainables import metrics as M
from trainables.config import TrialConfig
from trainables.runner import load_state
from trainables.runner import measure_latency
from trainables.runner import record_epoch
from trainables.runner import run_trial
from trainables.runner import save_state


class Collect:
    def __init__(self) -> None:
        self.metrics, self.states = [], []

    def report(self, metrics, state):
        self.metrics.append(metrics)
        self.states.append(state)


DATA = {"batch_size": 64, "val_size": 300}
#: training images of the trials that test mechanics, not learning (a fifth of digits' split)
SUBSET = 256


def _cfg(**kw) -> TrialConfig:
    base = {
        "epochs": 3,
        "seed": 7,
        "model": {"name": "dyresnet8", "gate_factor": 0.5},
        "optim": {"lr": 0.05},
        "data": {**DATA, "train_subset": SUBSET},
    }
    base.update(kw)
    return TrialConfig.model_validate(base)


def test_tiny_dgc_network_learns_digits():
    out = Collect()
    final = run_trial(_cfg(epochs=4, data=DATA), out)  # every training image
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


def test_a_trial_resumed_from_its_last_checkpoint_reports_its_end_again_without_training(
    tmp_path,
):
    full = Collect()
    run_trial(_cfg(epochs=2), full)
    save_state(full.states[-1], tmp_path / "state.pt")  # Tune's saved state was older
    again = Collect()
    final = run_trial(_cfg(epochs=2), again, resume=load_state(tmp_path / "state.pt"))
    assert again.states == [None]  # no epoch trained, no new checkpoint
    assert again.metrics == [final] and final[M.FINAL_REPEAT] is True
    assert {k: v for k, v in final.items() if k != M.FINAL_REPEAT} == full.metrics[-1]


def test_checkpoint_interval_and_weights_only_loading(tmp_path):
    out = Collect()
    run_trial(_cfg(checkpoint_every=2), out)
    assert [s is not None for s in out.states] == [False, True, True]  # every 2 and the end
    save_state(out.states[-1], tmp_path / "s.pt")
    state = load_state(tmp_path / "s.pt")  # weights_only=True
    assert state["epoch"] == 3 and state["config"]["model"]["name"] == "dyresnet8"


def test_recorded_epochs_append_metrics_and_keep_the_last_checkpoint(tmp_path):
    out = Collect()
    run_trial(_cfg(checkpoint_every=2), out)
    folder = tmp_path / "run"
    for metrics, state in zip(out.metrics, out.states):
        record_epoch(folder, metrics, state)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)[M.EPOCH] for line in lines] == [1, 2, 3]
    assert load_state(folder / "state.pt")["epoch"] == 3
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "state.pt"]


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
    # every layer's kernel choices travel with it (none settled yet: in so short a run no
    # shape recurs often enough to be timed, dgc.layers.kernel_choice)
    assert state["kernels"].keys() == dgc.kernel_choices(dgc.create_model("dyresnet8")).keys()
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


def test_a_distilled_trial_resumed_mid_run_keeps_its_teacher_and_ends_as_if_never_stopped(
    tmp_path, deterministic
):
    cfg = _cfg(epochs=3, pretrain_epochs=1, distill={"weight": 0.5})
    full = Collect()
    run_trial(cfg, full)
    assert "teacher" in full.states[-1]  # the trial's own dense network, for a resume

    class Snapshot(Collect):
        def report(self, metrics, state):
            super().report(metrics, state)
            if metrics[M.EPOCH] == 2:
                save_state(state, tmp_path / "state.pt")
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, Snapshot())
    resumed = Collect()
    run_trial(cfg, resumed, resume=load_state(tmp_path / "state.pt"))
    a, b = full.states[-1], resumed.states[-1]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])


def test_the_static_group_conv_pretrains_its_teacher_when_it_distils(caplog):
    import logging

    cfg = _cfg(epochs=3, pretrain_epochs=1, model={"name": "gcresnet8"}, distill={"weight": 0.5})
    out = Collect()
    with caplog.at_level(logging.INFO, logger="trainables.runner"):
        run_trial(cfg, out)
    assert "pretraining resnet8 for 1 epochs" in caplog.text  # the same teacher as DGC's
    assert [m[M.EPOCH] for m in out.metrics] == [2, 3]  # the same budget of 3 epochs


def test_a_teacher_checkpoint_teaches_and_distillation_without_one_is_refused(tmp_path):
    dense = dgc.create_model("resnet8", num_classes=10, in_chans=1)
    save_state({"model": dense.state_dict()}, tmp_path / "dense.pt")
    cfg = _cfg(epochs=1, distill={"weight": 0.5, "teacher": str(tmp_path / "dense.pt")})
    out = Collect()
    run_trial(cfg, out)
    assert "teacher" not in out.states[-1]  # its file is where it was
    with pytest.raises(ValueError, match=r"distill.weight=0.5 needs a teacher"):
        run_trial(_cfg(distill={"weight": 0.5}), Collect())  # refused before any epoch
