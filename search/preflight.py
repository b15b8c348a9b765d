"""Everything checked before a cluster starts: data layout, parameter paths, buildable models
at every corner of the space, and the MACs range the space spans against the budget."""

from __future__ import annotations

import math
from dataclasses import astuple
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

import dgc
from dgc.cost import Cost
from search.config import ExperimentConfig
from search.overrides import SearchConfigError
from spaces.convert import apply_to_trial
from spaces.convert import assemble
from spaces.convert import corner_values
from spaces.convert import suggest
from spaces.errors import format_validation_error
from spaces.schema import is_active
from trainables.config import TrialConfig
from trainables.data import split_indices
from trainables.datasets import DatasetError
from trainables.datasets import count_training_images
from trainables.datasets import describe
from trainables.runner import trial_cost

#: the space key that chooses the network (and with it the operator)
NAME_KEY = "model.name"


@dataclass(frozen=True)
class Problem:
    """What every sampled point needs: classes, input size, stages."""

    num_classes: int
    input_size: tuple[int, int, int]
    num_stages: int


@dataclass(frozen=True)
class Report:
    problem: Problem
    macs: list[int]
    over_budget: int
    notes: tuple[str, ...] = ()

    def summary(self, budget: float | None) -> str:
        lo, hi = min(self.macs), max(self.macs)
        text = (
            f"{len(self.macs)} sampled configurations span {lo / 1e6:.2f} to {hi / 1e6:.2f} M MACs"
        )
        if budget:
            text += (
                f"; {self.over_budget} of them ({100 * self.over_budget / len(self.macs):.0f}%)"
                f" are over the budget of {budget / 1e6:.2f} M and would never train"
            )
        return text


def problem_of(exp: ExperimentConfig, source: str) -> Problem:
    data = exp.trial.data
    try:
        classes, size = describe(data)
        split_indices(data.val_size, count_training_images(data), data.split_seed)
    except DatasetError as err:
        raise SearchConfigError(f"{source}: trial.data: {err}") from err
    return Problem(classes, size, _num_stages(exp, source))


def _num_stages(exp: ExperimentConfig, source: str) -> int:
    """Stages of the searched model; with ``model.name`` in the space, every choice's (they
    must agree where a parameter is per stage)."""
    names = {"trial.model.name": exp.trial.model.name}
    p = exp.space.params.get(NAME_KEY)
    if p is not None and p.type == "categorical":
        names |= {f"space.params.{NAME_KEY} = {c!r}": c for c in p.choices}
    stages = {}
    for where, name in names.items():
        try:
            stages[where] = dgc.num_stages(str(name))
        except ValueError as err:
            raise SearchConfigError(f"{source}: {where}: {err}") from err
    counts = set(stages.values())
    if len(counts) > 1 and any(q.per_stage for q in exp.space.params.values()):
        raise SearchConfigError(
            f"{source}: space: the models of {NAME_KEY} have different numbers of stages "
            f"({', '.join(f'{w}: {n}' for w, n in stages.items())}), so per_stage parameters "
            "have no one length; search models with the same stages or drop per_stage"
        )
    return stages["trial.model.name"] if p is None else max(counts)


def cost_point(
    exp: ExperimentConfig, problem: Problem, assignments: dict[str, Any]
) -> tuple[dict[str, Any], Cost]:
    """The trial config (a dict, as Tune receives it) of one point of the space and its
    analytic cost: the one costing path of preflight and the searcher.

    Raises:
        ValidationError: the point is not a valid TrialConfig.
        ValueError, TypeError: the model cannot be built with these settings.
    """
    config = apply_to_trial(exp.trial.model_dump(mode="json"), assignments)
    cfg = TrialConfig.model_validate(config)
    return config, trial_cost(cfg, problem.num_classes, problem.input_size)


def point_macs(
    exp: ExperimentConfig, problem: Problem, assignments: dict[str, Any], source: str, where: str
) -> int:
    """MACs of one point, or SearchConfigError naming the file, the point and the rule."""
    try:
        return cost_point(exp, problem, assignments)[1].macs
    except ValidationError as err:
        raise SearchConfigError(
            format_validation_error(err, f"{source}: {where}", prefix="trial")
        ) from err
    except ValueError as err:
        raise SearchConfigError(f"{source}: {where}: {err}") from err
    except TypeError as err:  # a keyword the recipe does not take (trial.model.kwargs)
        kwargs = exp.trial.model.kwargs
        raise SearchConfigError(
            f"{source}: {where}: trial.model.kwargs = {kwargs!r}: {err}; remove the keyword "
            f"or check the signature of {exp.trial.model.name}'s recipe in dgc/models"
        ) from err


def _center_value(p: Any) -> Any:
    if p.type == "categorical":
        return corner_values(p)[0]
    mid = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
    return round(mid) if p.type == "int" else mid


def _point(
    exp: ExperimentConfig, problem: Problem, fixed: dict[str, Any], centre: bool = True
) -> dict[str, Any]:
    """A point of the space: ``fixed`` values, the centre elsewhere (or the trial config's
    values, ``centre=False``); conditional parameters only where their condition holds."""
    values: dict[str, Any] = {}
    for key, p in exp.space.params.items():
        if not is_active(p, values) or (key not in fixed and not centre):
            continue
        v = fixed.get(key, _center_value(p))
        values[key] = [v] * problem.num_stages if p.per_stage and not isinstance(v, list) else v
    return values


def _enabling(p: Any) -> dict[str, Any]:
    """Values that make a conditional parameter active (the first allowed of each)."""
    return {k: allowed[0] for k, allowed in (p.when or {}).items()}


#: below this share of random points within budget, a space is refused (the sampler would
#: flood the study with over-budget placeholders).
MIN_FEASIBLE_SHARE = 0.05


def run_preflight(
    exp: ExperimentConfig, source: str, samples: int = 32, address: str | None = None
) -> Report:
    """Raise SearchConfigError on the first problem; otherwise the MACs range report.
    ``address``: the cluster a launch joins (--address), if any."""
    from search.cluster import check_local_fit
    from search.endpoints import check_endpoints

    check_local_fit(exp, source, address)
    check_endpoints(exp, source)
    problem = problem_of(exp, source)
    for key, p in exp.space.params.items():  # each value alone first: errors name it
        for v in corner_values(p):
            point = _point(exp, problem, {**_enabling(p), key: v}, centre=False)
            point_macs(exp, problem, point, source, f"space.params.{key} = {v!r}")
    macs = [point_macs(exp, problem, _point(exp, problem, {}), source, "space (centre point)")]
    for key, p in exp.space.params.items():
        for v in corner_values(p):
            point = _point(exp, problem, {**_enabling(p), key: v})
            macs.append(point_macs(exp, problem, point, source, f"space.params.{key} = {v!r}"))
    for i, fixed in enumerate(exp.warm_start):
        point = _point(exp, problem, fixed)
        macs.append(point_macs(exp, problem, point, source, f"warm_start[{i}]"))
    _check_references(exp, problem, source)
    _check_pretrain(exp, source)
    random = _random_macs(exp, problem, source, samples)
    macs += random
    budget = exp.budget.macs
    over = sum(m > budget for m in macs) if budget else 0
    if budget and over == len(macs):
        raise SearchConfigError(
            f"{source}: budget.macs = {budget:g} is below every configuration "
            f"of the space (smallest seen: {min(macs):,} MACs); raise the "
            "budget or allow cheaper settings (smaller gate_factor)"
        )
    feasible = sum(m <= budget for m in random) if budget else len(random)
    if feasible < MIN_FEASIBLE_SHARE * len(random):
        raise SearchConfigError(
            f"{source}: budget.macs = {budget:g}: only {feasible} of {len(random)} random points "
            f"of the space are within it ({100 * feasible / len(random):.0f}%, under "
            f"{100 * MIN_FEASIBLE_SHARE:.0f}%), so the sampler would mostly draw points that "
            "never train; raise the budget or narrow the space to cheaper settings"
        )
    return Report(problem, macs, over, scheduler_notes(exp))


def scheduler_notes(exp: ExperimentConfig) -> tuple[str, ...]:
    """Warnings about an early-stopping scheduler whose rungs come before the DGC ramp ends:
    there every DGC network is still nearly dense, so the rung ranks unpruned networks."""
    from search.scheduler import rung_epochs

    s = exp.scheduler
    if s is None:
        return ()
    rungs = rung_epochs(s.grace_period, s.reduction_factor, exp.trial.epochs)
    ramp_end = exp.trial.gate_schedule.resolve(exp.trial.epochs).ramp_end * exp.trial.epochs
    text = f"{s.name} compares trials at epochs {rungs} of {exp.trial.epochs}"
    if rungs[0] >= ramp_end:
        return (f"{text}; the gate ramp ends at epoch {ramp_end:g}, by the first rung",)
    return (
        f"{text}, but the gate ramp ends at epoch {ramp_end:g}: at the earlier rungs DGC "
        "networks are not yet pruned to their gate factors, so those rungs rank nearly dense "
        "networks. Finish the ramp first, e.g. trial.gate_schedule: {warmup_end: "
        f"{min(0.5, rungs[0] / 4):g}, ramp_end: {rungs[0]}, unit: epochs}}",
    )


def _check_references(exp: ExperimentConfig, problem: Problem, source: str) -> None:
    """Every reference trial builds (they bypass the budget: they are what it is judged by)."""
    from search.references import reference_trials

    try:
        refs = reference_trials(exp)
    except ValueError as err:
        raise SearchConfigError(
            f"{source}: references: {err}; remove the references section or search a model of "
            "such a family (dgc.list_models())"
        ) from err
    for ref in refs:
        try:
            trial_cost(TrialConfig.model_validate(ref.config), *astuple(problem)[:2])
        except (ValueError, TypeError) as err:
            raise SearchConfigError(
                f"{source}: references: {ref.config['model']['name']} ({ref.label}) cannot be "
                f"built: {str(err).splitlines()[0]}; change or remove that reference"
            ) from err


def _check_pretrain(exp: ExperimentConfig, source: str) -> None:
    """The searched model can start from its family's dense network (same tensor shapes)."""
    if exp.pretrain is None:
        return
    name = exp.trial.model.name
    try:
        with dgc.on_meta():
            dense = dgc.create_model(dgc.variant_of(name, "dense")).state_dict()
            own = dgc.create_model(name, **exp.trial.model.arch_kwargs()).state_dict()
    except (ValueError, TypeError) as err:
        raise SearchConfigError(f"{source}: pretrain: {err}") from err
    clash = [k for k, v in dense.items() if k in own and own[k].shape != v.shape]
    if clash:
        raise SearchConfigError(
            f"{source}: pretrain: {name} cannot start from the dense network of its family "
            f"({clash[0]} has another shape); pretrain is for the DGC (dy...) and SG-CNN "
            "(sg...) models"
        )


def _random_macs(exp: ExperimentConfig, problem: Problem, source: str, n: int) -> list[int]:
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        values = assemble(exp.space, suggest(trial, exp.space, problem.num_stages),
                          problem.num_stages)  # fmt: skip
        out.append(point_macs(exp, problem, values, source, f"space (sample {trial.params})"))
    return out
