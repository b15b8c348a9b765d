"""A Ray Tune ``Searcher`` over an Optuna study (ask/tell), multi-objective and budget-aware.

Every suggestion is costed analytically before a worker sees it. A point over the MACs budget
never trains: it is PRUNED in the study with its constraint violation set
(``trial.set_constraint``) and ``over_budget=True`` in its user attributes. TPE reads pruned
trials and ranks one that violates a constraint by its violation, exactly as a completed one,
so constrained sampling learns the feasible region; and having no objective values, it is
never drawn on optuna-dashboard's front or history nor weighed in its importances (fake values
would be). NSGA-II's selection uses completed trials only, so it does not see them. It never
reaches Tune, MLflow or the Pareto front. Invalid points (a model that cannot be built) are
FAILed.

The study lives in persistent storage (SQLite in the experiment folder by default); each
Optuna trial records its Ray trial id, so a restored search tells the right trial, and its
label, operator and MLflow run (user attributes ``label``, ``operator``, ``mlflow_run_id``).

Reference trials are not points of the space: they are told to a study of their own,
``<study>.references``. In the searched study a trial without parameters would sit among the
best of every objective it leads (the dense network's accuracy) and make parameter importance
(PED-ANOVA, which optuna-dashboard draws) come out equal for every parameter.

A trial stays RUNNING in the study until it ends in Tune: an interrupted or failed trial that
``resume`` continues is told when it finishes, and only the end of a search FAILs what failed
for good (``conclude``). ``reconcile`` squares the study with Tune's saved state at resume: a
point suggested but never saved by Tune (the driver was killed in between) is suggested again,
a trial that Tune saw finish but the study did not hear of is told. The searcher hands out
``num_trials`` searched points and the references, no more (``remaining``).
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search import names as N
from search.config import ExperimentConfig
from search.interrupt import Stop
from search.preflight import Problem
from search.preflight import cost_point
from search.redact import redact
from search.references import reference_trials
from search.scheduler import stopped_at
from search.study import StudyRef
from search.study import enqueue_warm_start
from search.study import open_study
from spaces.convert import assemble
from spaces.convert import suggest as suggest_point
from trainables import metrics as M

log = logging.getLogger(__name__)

#: study user attribute prefix: reference label -> the Tune trial id it was issued as ("": not
#: issued, or to be issued again)
REFERENCE_KEY = "reference:"
#: trial user attribute: suggested, but Tune never saved it; suggest it again (``reconcile``)
REISSUE = "reissue"
#: trial user attribute: the FAILed trial this one repeats (it failed once, then trained)
RETRY_OF = "retry_of"
# Per suggestion; validate refuses spaces with < 5% feasible points (0.95**100 < 1%).
MAX_TRIES = 100


class OptunaSearcher(Searcher):
    """Suggests complete TrialConfig dicts; tells Optuna the final objectives of each trial."""

    def __init__(
        self,
        exp: ExperimentConfig,
        problem: Problem,
        ref: StudyRef,
        run_of: Callable[[str], str | None] | None = None,
        stop: Stop | None = None,
    ) -> None:
        """``run_of``: the MLflow run of a Ray trial id (recorded on its Optuna trial);
        ``stop``: the process's stop request (a stopping search suggests nothing)."""
        super().__init__()
        self.exp, self.problem, self.ref, self.run_of = exp, problem, ref, run_of
        self.stop = stop
        self.live: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.gave_up = False  # no new trainable point found (``suggest`` said FINISHED)
        self._study: optuna.Study | None = None
        self._references: optuna.Study | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the searcher into tuner.pkl; a restore is given a new one (tune_runs),
        # so the copy keeps no credential, no connection and no link to this process.
        state = self.__dict__.copy()
        state["_study"] = state["_references"] = None  # connections do not pickle
        state["stop"] = state["run_of"] = None
        state["ref"] = StudyRef(redact(self.ref.storage), self.ref.name)
        text = redact(json.dumps(self.exp.model_dump(mode="json")))
        state["exp"] = ExperimentConfig.model_validate(json.loads(text))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = {"run_of": None, "_references": None, "stop": None, "gave_up": False}
        self.__dict__.update({**defaults, **state})  # older pickles

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = open_study(self.exp, self.ref)
            enqueue_warm_start(self._study, self.exp, self.problem.num_stages)
        return self._study

    @property
    def references(self) -> optuna.Study:
        """The study the reference trials are told to (opened on the first one)."""
        if self._references is None:
            self._references = open_study(self.exp, self.ref.references)
        return self._references

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return True  # objectives come from the experiment, in exactly one place

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        # Searcher.FINISHED (a str) ends the search, as Ray documents; Ray's annotation of
        # suggest (Optional[Dict]) leaves it out, hence the ignores on its returns
        if self.stop is not None and self.stop.requested:
            return None  # the search is stopping: nothing new
        again = self._reissue(trial_id)
        if again is not None:
            return again
        if self.remaining() <= 0:
            return Searcher.FINISHED  # type: ignore[return-value]  # num_trials lowered at resume
        reference = self._next_reference(trial_id)
        if reference is not None:
            return reference
        for _ in range(MAX_TRIES):
            trial = self.study.ask()
            suggest_point(trial, self.exp.space, self.problem.num_stages)  # define-by-run
            if self._duplicate(trial):
                continue
            config = self._costed_config(trial)
            if config is not None:
                return self._issue(trial.number, trial_id, config)
        log.warning(
            "no new trainable point in %d samples (over the budget, unbuildable or already in "
            "the study); stopping the search",
            MAX_TRIES,
        )
        self.gave_up = True
        return Searcher.FINISHED  # type: ignore[return-value]

    def _issue(self, number: int, trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
        """Hand study trial ``number`` to Tune as ``trial_id`` (recorded in the study first)."""
        config["tags"] = {N.OPTUNA_TRIAL_TAG: number}
        for key, value in _attrs(config, trial_id).items():
            self._set_attr(number, key, value)
        self.live[trial_id] = number
        return config

    def _reissue(self, trial_id: str) -> dict[str, Any] | None:
        """A point ``reconcile`` found suggested but never saved by Tune, suggested again (one
        stopped while it was sampled is completed by the sampler first)."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not t.user_attrs.get(REISSUE):
                continue
            self._set_attr(t.number, REISSUE, False)
            trial = optuna.Trial(self.study, t._trial_id)  # noqa: SLF001 (the running trial)
            suggest_point(trial, self.exp.space, self.problem.num_stages)
            config = self._costed_config(trial)
            if config is None:
                continue  # told PRUNED (over the budget) or FAIL (cannot be built)
            log.info("Optuna trial %d was suggested before the stop but never started; "
                     "suggesting it again", t.number)  # fmt: skip
            return self._issue(t.number, trial_id, config)
        return None

    def issued(self) -> int:
        """Trials handed to Tune so far: sampled ones with a Ray trial id, and references."""
        sampled = sum(1 for t in self.study.get_trials(deepcopy=False)
                      if N.TRIAL_TAG in t.user_attrs and RETRY_OF not in t.user_attrs)  # fmt: skip
        refs = sum(1 for k, v in self.study.user_attrs.items() if k.startswith(REFERENCE_KEY) and v)
        return sampled + refs

    def remaining(self) -> int:
        """Trials still to hand to Tune: the experiment's total (``num_trials`` and the
        references) less those issued, plus those to be suggested again."""
        total = self.exp.num_trials + len(reference_trials(self.exp))
        again = sum(
            1
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(REISSUE) and N.TRIAL_TAG in t.user_attrs
        )
        return total - self.issued() + again

    def _next_reference(self, trial_id: str) -> dict[str, Any] | None:
        """The next reference trial not yet issued (recorded in the study at once, so a resumed
        search never issues one twice), with its Tune trial id."""
        issued = self.study.user_attrs
        for ref in reference_trials(self.exp):
            key = REFERENCE_KEY + ref.label
            if not issued.get(key):
                self.study.set_user_attr(key, trial_id)
                return {**ref.config, "tags": {N.REFERENCE_TAG: ref.label}}
        return None

    def _reference_of(self, trial_id: str) -> str | None:
        for key, value in self.study.user_attrs.items():
            if key.startswith(REFERENCE_KEY) and value == trial_id:
                return key.removeprefix(REFERENCE_KEY)
        return None

    def _tell_reference(self, label: str, trial_id: str, result: dict | None) -> None:
        """A reference is added to the study when it ends, without parameters (it is not a
        point of the space), flagged ``reference``: the sampler's models skip it, the study's
        front and its dashboard show it."""
        result = result or {}
        values = [result.get(o.metric) for o in self.exp.objectives]
        stopped = stopped_at(result, self.exp.trial.epochs)
        earlier = self._told(trial_id)
        if any(t.state != TrialState.FAIL for t in earlier) or (earlier and not result):
            return  # told already (or failed again)
        config = next(r.config for r in reference_trials(self.exp) if r.label == label)
        attrs: dict[str, Any] = {
            N.REFERENCE_TAG: label,
            **_attrs({**config, "tags": {N.REFERENCE_TAG: label}}, trial_id),
            **self._run_attr(trial_id),
        }
        if earlier:
            attrs[RETRY_OF] = earlier[-1].number
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        if stopped is not None:
            state, attrs[N.STOPPED_TAG] = TrialState.PRUNED, stopped
        elif result and len(numbers) == len(values):
            state = TrialState.COMPLETE
        else:
            state = TrialState.FAIL
        self.references.add_trial(
            optuna.trial.create_trial(
                state=state,
                values=numbers if state == TrialState.COMPLETE else None,
                params={},
                distributions={},
                user_attrs=attrs,
            )
        )

    def _duplicate(self, trial: optuna.Trial) -> bool:
        """A point the study already trained or is training (a categorical space, or a sampler
        replaying its draws) is not trained again: FAIL, with ``duplicate_of``."""
        held = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
        for t in self.study.get_trials(deepcopy=False, states=held):
            if t.number != trial.number and t.params == trial.params and M.MACS in t.user_attrs:
                if t.user_attrs.get(N.OVER_BUDGET_ATTR):
                    continue  # its twin is costed and refused again below
                trial.set_user_attr(N.DUPLICATE_OF_ATTR, t.number)
                self.study.tell(trial, state=TrialState.FAIL)
                return True
        return False

    def _costed_config(self, trial: optuna.Trial) -> dict[str, Any] | None:
        values = assemble(self.exp.space, trial.params, self.problem.num_stages)
        try:
            config, cost = cost_point(self.exp, self.problem, values)
        except (ValueError, TypeError) as err:  # ValidationError is a ValueError
            trial.set_user_attr(N.INVALID_ATTR, str(err).splitlines()[0])
            self.study.tell(trial, state=TrialState.FAIL)
            log.info("Optuna trial %d cannot be built (%s); not trained", trial.number, err)
            return None
        trial.set_user_attr(M.MACS, cost.macs)
        trial.set_user_attr(M.PARAMS, cost.params)
        budget = self.exp.budget.macs
        if budget is None:
            return config
        trial.set_constraint("macs_over_budget", cost.macs - budget)
        if cost.macs <= budget:
            return config
        trial.set_user_attr(N.OVER_BUDGET_ATTR, True)
        self.study.tell(trial, state=TrialState.PRUNED)
        log.info(
            "Optuna trial %d: %.2f M MACs is over the budget; not trained",
            trial.number,
            cost.macs / 1e6,
        )
        return None

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Tell the study how a trial ended. A trial that raised stays RUNNING: ``resume``
        runs it again from its last checkpoint, and ``conclude`` FAILs it at the end."""
        if error:
            return
        label = self._reference_of(trial_id)
        if label is not None:
            self._tell_reference(label, trial_id, result)
            return
        number = self.live.pop(trial_id, None)
        if number is None:
            number = self._number_of(trial_id)
        if number is None:
            return
        for key, value in self._run_attr(trial_id).items():
            self._set_attr(number, key, value)
        self._tell(number, result or {})

    def _told(self, trial_id: str) -> list[optuna.trial.FrozenTrial]:
        """The reference trials told as ``trial_id`` (older searches kept them in the searched
        study)."""
        told = self.references.trials + self.study.trials
        return [t for t in told if t.user_attrs.get(N.TRIAL_TAG) == trial_id and not t.params]

    def _tell(self, number: int, result: dict) -> None:
        values = [result.get(o.metric) for o in self.exp.objectives]
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        stopped = stopped_at(result, self.exp.trial.epochs)
        told: list[float] | None = None
        if stopped is not None and all(v is not None for v in values):
            state = TrialState.PRUNED
        elif not result or len(numbers) < len(values):
            state = TrialState.FAIL
        else:
            state, told = TrialState.COMPLETE, numbers
        trial = self.study.get_trials(deepcopy=False)[number]
        if trial.state == TrialState.FAIL and state != TrialState.FAIL:
            self._retold(trial, state, told, stopped)  # failed once, trained since
            return
        if state == TrialState.PRUNED and stopped is not None:  # PRUNED: stopped is set
            self._prune(number, stopped)
        else:
            self.study.tell(number, told, state=state, skip_if_finished=True)

    def _retold(
        self,
        failed: optuna.trial.FrozenTrial,
        state: TrialState,
        values: list[float] | None,
        stopped: int | None,
    ) -> None:
        """A trial the study FAILed at the end of an earlier run that has trained since (a
        resume ran it again): added as a new trial with its result, ``retry_of`` the old."""
        if any(t.user_attrs.get(RETRY_OF) == failed.number for t in self.study.trials):
            return  # told already
        attrs = {**failed.user_attrs, RETRY_OF: failed.number}
        if stopped is not None:
            attrs[N.STOPPED_TAG] = stopped
        self.study.add_trial(
            optuna.trial.create_trial(
                state=state,
                values=values,
                params=failed.params,
                distributions=failed.distributions,
                user_attrs=attrs,
            )
        )

    def _prune(self, number: int, epoch: int) -> None:
        """A trial the scheduler stopped: PRUNED, with the epoch it reached. Its rung values
        are not told as objectives (they would put a half-trained network on the study's front);
        TPE still learns from it, as a bad region (its pruned trials rank below every complete
        one); NSGA-II's selection ignores it."""
        self._set_attr(number, N.STOPPED_TAG, epoch)
        self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)

    def _set_attr(self, number: int, key: str, value: Any) -> None:
        """A user attribute of the trial ``number`` (no longer held as a Trial) while it runs;
        a finished one (told before a restore) cannot change and is left as it is."""
        storage = self.study._storage  # noqa: SLF001 (Optuna has no public setter after ask)
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)  # noqa: SLF001
        if not storage.get_trial(trial_id).state.is_finished():
            storage.set_trial_user_attr(trial_id, key, value)

    def _run_attr(self, trial_id: str) -> dict[str, str]:
        """``{mlflow_run_id: ...}`` of a Ray trial, if its MLflow run can be found. It is only
        a link: a failed lookup (the tracking server away) is logged, never raised into Tune."""
        if self.run_of is None:
            return {}
        try:
            run_id = self.run_of(trial_id)
        except Exception as err:  # noqa: BLE001 (any tracking failure; the tell must go on)
            log.warning("no MLflow run id for trial %s on its Optuna trial (%s)", trial_id, err)
            return {}
        return {N.MLFLOW_RUN_ATTR: run_id} if run_id else {}

    def _number_of(self, trial_id: str) -> int | None:
        """The study trial issued as ``trial_id`` (the first, not a ``retry_of`` copy)."""
        for t in self.study.get_trials(deepcopy=False):
            if t.user_attrs.get(N.TRIAL_TAG) == trial_id and RETRY_OF not in t.user_attrs:
                return t.number
        return None

    def reconcile(self, tune_trials: dict[str, tuple[str, dict]]) -> int:
        """Square the study with Tune's saved state before a resume (``tune_trials``: Ray
        trial id -> (status, last result) over every Tune run of the search). A point the study
        handed out that Tune never saved is suggested again; one Tune saw finish is told.
        Returns how many points are suggested again."""
        again = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            known = tune_trials.get(t.user_attrs.get(N.TRIAL_TAG, ""))
            if known is None:
                self._set_attr(t.number, REISSUE, True)
                again += 1
            elif known[0] == "TERMINATED":
                self._tell(t.number, known[1])
        for key, trial_id in self.study.user_attrs.items():
            if not key.startswith(REFERENCE_KEY) or not trial_id or self._told(trial_id):
                continue
            known = tune_trials.get(trial_id)
            if known is None:
                self.study.set_user_attr(key, "")  # issued, never saved by Tune: issue again
                again += 1
            elif known[0] == "TERMINATED":
                self._tell_reference(key.removeprefix(REFERENCE_KEY), trial_id, known[1])
        return again

    def conclude(self, keep: set[str] | None = None) -> int:
        """At the end of a search: FAIL what is still RUNNING in the study (trials that
        failed for good), but the Ray trials in ``keep`` (paused by a spent budget: a raised
        budget continues them), and record failed references. Returns how many."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        failed = [t for t in running if t.user_attrs.get(N.TRIAL_TAG) not in (keep or set())]
        for t in failed:
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        refs = 0
        for key, trial_id in self.study.user_attrs.items():
            if trial_id in (keep or set()):
                continue
            if key.startswith(REFERENCE_KEY) and trial_id and not self._told(trial_id):
                self._tell_reference(key.removeprefix(REFERENCE_KEY), trial_id, None)
                refs += 1
        return len(failed) + refs

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"live": self.live}, f)

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        # The driver may die before Tune snapshots the searcher; the study, which records each
        # trial's Ray id, is the source of truth, so a missing snapshot is not an error.
        try:
            super().restore_from_dir(checkpoint_dir)
        except (RuntimeError, FileNotFoundError) as err:
            log.info("no searcher snapshot to restore (%s); using the study's records", err)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.live = pickle.load(f)["live"]  # noqa: S301 (our own file in the experiment dir)


def _attrs(config: dict[str, Any], trial_id: str) -> dict[str, str]:
    """What tells a trial apart on optuna-dashboard: its Ray trial id, label (the MLflow run's
    name) and operator."""
    import dgc

    return {
        N.TRIAL_TAG: trial_id,
        N.LABEL_ATTR: N.trial_label(config["tags"]),
        N.OPERATOR_TAG: dgc.model_kind(str(config["model"]["name"])),
    }
