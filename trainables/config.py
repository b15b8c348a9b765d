"""TrialConfig: everything one training run needs, validated (unknown keys rejected)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any
from typing import Literal

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import model_validator

if TYPE_CHECKING:  # dgc (and torch) load where a run is built, not with its config
    from dgc.layers.schedule import GateSchedule

#: numpy's and Optuna's seeds are 32-bit unsigned
MAX_SEED = 2**32 - 1

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "imagenet")


class StrictModel(BaseModel):
    """The base of every config model of trainables/ and search/: an unknown key is refused
    (a misspelt setting never passes silently) and an assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(StrictModel):
    """The network: a registered ``dgc`` name and its architecture settings.

    DGC (``dy...``): ``heads``, ``gate_factor``, ``squeeze_rate``; static group (``gc...``):
    ``gate_factor``; SG-CNN (``sg...``): ``compression``, ``sg_groups``, ``sg_steps``; DyNet
    (``dn...``): ``kernels``; ResNets: ``width_mult``. Per-stage settings take one value or one
    per stage; ``kwargs`` passes any other keyword of the recipe. Unset values use the
    recipe's defaults; a setting of another operator is refused when the model is built.
    """

    name: str = "dyresnet8"
    heads: int | list[int] | None = None
    gate_factor: float | list[float] | None = None
    squeeze_rate: int | list[int] | None = None
    compression: float | list[float] | None = None
    sg_groups: int | list[int] | None = None
    sg_steps: int | None = None
    kernels: int | list[int] | None = None
    width_mult: float | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def arch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``dgc.create_model`` (None values are dropped there)."""
        fields = self.model_dump(exclude={"name", "kwargs"})
        return {**fields, **self.kwargs}

    def variant(self, name: str, gate_factor: float | None = None) -> ModelParams:
        """The same backbone as ``name`` (another operator of the family, e.g. its dense
        network), without this model's operator settings; ``gate_factor`` for a static group."""
        from dgc.layers.conv import OWN_SETTINGS

        own = {s for names in OWN_SETTINGS.values() for s in names}
        kwargs = {k: v for k, v in self.kwargs.items() if k not in own}
        return ModelParams(name=name, gate_factor=gate_factor, width_mult=self.width_mult,
                           kwargs=kwargs)  # fmt: skip


class DataParams(StrictModel):
    """Where the images come from and how they are split and batched.

    The validation split is carved from the training set with ``split_seed`` (the same for
    every trial); model selection and the search see only it. The test set is evaluated once.
    """

    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "imagenet"] = "digits"
    datadir: str | None = None
    val_size: float = Field(0.1, gt=0)
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    train_subset: int | None = Field(None, ge=1)
    augment: bool | None = None
    image_size: int | None = Field(None, ge=8)
    cache_dir: str | None = None
    workers: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _needs_datadir(self) -> DataParams:
        if self.dataset != "digits" and not self.datadir:
            raise ValueError(
                f"dataset={self.dataset!r} reads from disk: set data.datadir to the "
                "folder that holds it (digits is the only built-in dataset)"
            )
        return self


class OptimParams(StrictModel):
    """SGD with Nesterov momentum and a per-iteration schedule, the paper's recipe by default."""

    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    lasso: float = Field(1e-5, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    warmup_epochs: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    #: a low-lr fine-tune of the pruned network: where set, the lr restarts at this fraction
    #: of ``lr`` when the gate ramp ends and decays by cosine to 0 over the rest of the run
    #: (None: one schedule over the whole run).
    finetune_lr: float | None = Field(None, gt=0, le=1)
    #: multistep: epochs at whose start the lr is multiplied by ``gamma``. Default, as the
    #: authors: the first epochs at or past 50% and 75% of the run (CIFAR), every 30 epochs
    #: on ImageNet.
    milestones: list[int] | None = None
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _increasing(self) -> OptimParams:
        m = self.milestones
        if m is not None and (any(e < 1 for e in m) or any(b <= a for a, b in zip(m, m[1:]))):
            raise ValueError(f"milestones={m} must be strictly increasing epochs >= 1")
        return self


class DistillParams(StrictModel):
    """Distillation from a dense teacher of the trial's family: the loss is ``(1 - weight) *
    cross-entropy + weight * T^2 * KL(teacher || student)`` at temperature ``T`` (Hinton et
    al. 2015), the teacher's logits computed on the same augmented batch, in eval mode and
    without grad. weight 0 (the default): no teacher, today's loss.

    ``teacher``: a checkpoint (``state.pt`` of a trial or of ``search train --out``) of the
    family's dense network. None: the network this trial starts from, its own
    ``pretrain_epochs`` network or the search's pretrained one (``init_from``).
    """

    weight: float = Field(0.0, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)
    teacher: str | None = None


class GateScheduleParams(StrictModel):
    """Breakpoints of DGC's deactivation ramp as the experiment file gives them: nothing pruned
    up to ``warmup_end``, the target sparsity reached at ``ramp_end``, fine-tuning after. In
    ``unit`` of the run (``fraction``, the paper's 1/12 and 3/4 by default) or of ``epochs``
    (e.g. ``{warmup_end: 0.5, ramp_end: 2, unit: epochs}`` finishes pruning after epoch 2 of
    any run length). ``resolve`` turns them into the one model of the ramp,
    ``dgc.GateSchedule``; the paper's own expression runs only with the defaults exactly
    (``GateSchedule.is_paper``): 0.0833 is not 1/12."""

    # dgc.layers.schedule's WARMUP_END and RAMP_END, the paper's (written out: this module
    # loads without torch; tests/trainables/test_config.py checks that they agree)
    warmup_end: float = Field(1.0 / 12.0, ge=0, allow_inf_nan=False)
    ramp_end: float = Field(3.0 / 4.0, ge=0, allow_inf_nan=False)
    unit: Literal["fraction", "epochs"] = "fraction"

    @model_validator(mode="after")
    def _ordered(self) -> GateScheduleParams:
        if self.warmup_end > self.ramp_end:
            raise ValueError(
                f"warmup_end={self.warmup_end} is after ramp_end={self.ramp_end}; the warm-up "
                "must end before (or when) the ramp does"
            )
        if self.unit == "fraction" and self.ramp_end > 1:
            raise ValueError(
                f"ramp_end={self.ramp_end} is past the end of the run (unit: fraction, at most "
                "1); give a fraction, or set unit: epochs"
            )
        return self

    def resolve(self, epochs: int) -> GateSchedule:
        """The ramp of a run of ``epochs`` epochs, its breakpoints as fractions of the run."""
        from dgc.layers.schedule import GateSchedule

        if self.unit == "fraction":
            return GateSchedule(self.warmup_end, self.ramp_end)
        return GateSchedule(self.warmup_end / epochs, self.ramp_end / epochs)


class TrialConfig(StrictModel):
    """One trial, completely: model, data, optimiser, schedule length, seed and runtime."""

    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams = Field(default_factory=DataParams)
    optim: OptimParams = Field(default_factory=OptimParams)
    epochs: int = Field(30, ge=1)
    gate_schedule: GateScheduleParams = Field(default_factory=GateScheduleParams)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    checkpoint_every: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    channels_last: bool = True
    #: ``torch.compile`` the training step's model: True (or "default"), "reduce-overhead"
    #: (also CUDA graphs: launch overhead removed; the batches have one shape, the last partial
    #: one dropped) or "max-autotune". A DGC layer compiles once for every kept count.
    #: Evaluation runs the eager model. Compilation is paid per trial: worth it where an epoch
    #: takes much longer than compiling.
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False
    #: torch's CPU threads for the trial; None: a Ray trial's CPUs, elsewhere torch's own count
    threads: int | None = Field(None, ge=1)
    #: a checkpoint (``state.pt`` of a trial or of ``search train --out``) whose weights start
    #: this network where names and shapes match, e.g. a trained dense network of the family
    #: for its DGC variant (the head kernels have the dense conv's shape); the rest (gates,
    #: the DGC layers' own norms) keeps its initialisation. Ignored when resuming.
    init_from: str | None = None
    #: for a DGC model, the first ``pretrain_epochs`` of ``epochs`` train its family's dense
    #: network (same recipe), and the DGC network then starts from it for the rest (its gate
    #: schedule and lr schedule span those). Other models train all ``epochs`` themselves: the
    #: same budget. A search can share one pretrained network instead (``pretrain:``).
    pretrain_epochs: int = Field(0, ge=0)
    #: distillation from a dense teacher of the family (off by default).
    distill: DistillParams = Field(default_factory=DistillParams)
    #: after the last epoch, the BatchNorm statistics are measured again over this many
    #: training batches (the network at its final sparsity, no gradient): the running
    #: averages otherwise hold the pruning ramp's earlier networks too. 0: not done.
    recalibrate_bn: int = Field(0, ge=0)
    #: measure batch-1 inference latency once per trial and report it (``latency_ms``).
    measure_latency: bool = False
    #: bookkeeping set by the search (e.g. the Optuna trial number); training ignores it.
    tags: dict[str, int | float | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _pretrain_within_run(self) -> TrialConfig:
        if self.pretrain_epochs >= self.epochs:
            raise ValueError(
                f"pretrain_epochs={self.pretrain_epochs} leaves no epoch of epochs="
                f"{self.epochs} to train the network itself; lower it or raise epochs"
            )
        if self.pretrain_epochs and self.init_from:
            raise ValueError("pretrain_epochs and init_from both choose the start; give one")
        return self

    def teacher_missing(self, search_pretrains: bool = False) -> str | None:
        """Why ``distill`` has no teacher to learn from, or None. ``search_pretrains``: the
        search's ``pretrain:`` trains one (it becomes every trial's ``init_from``)."""
        d = self.distill
        if d.weight == 0 or d.teacher or self.pretrain_epochs or self.init_from or search_pretrains:
            return None
        return (
            f"distill.weight={d.weight} needs a teacher: set distill.teacher to a checkpoint "
            "of the family's dense network, or pretrain_epochs (the trial's own dense "
            "network teaches), or init_from / the search's pretrain: (that network teaches)"
        )

    @model_validator(mode="after")
    def _ramp_within_run(self) -> TrialConfig:
        g, own = self.gate_schedule, self.epochs - self.pretrain_epochs
        if g.unit == "epochs" and g.ramp_end > own:
            raise ValueError(
                f"gate_schedule.ramp_end={g.ramp_end} epochs is past the end of the run "
                f"(epochs={self.epochs}, of which pretrain_epochs={self.pretrain_epochs}); the "
                "network would never reach its target sparsity. Lower ramp_end or raise epochs"
            )
        return self
