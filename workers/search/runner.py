"""A whole search (run_search): the Tune trials, the fixed arms beside them, the trials' outcomes.
Each trial and each fixed arm trains one configuration on every seed (workers.search.seeds).

* ``search.baseline`` adds the standard loss (``loss.kind: standard``) on the same seeds with the
  same recipe and data order (``train.seed`` is the data-order seed), as a Ray task started next to
  the search: not a Tune trial, so no scheduler stops it early and no searcher learns from it.
  ``search.confirmatory`` adds, the same way, the spec's own ``loss`` section: a configuration
  fixed before the search, so its comparison with the baseline involves no selection. With
  ``evidence.target_halfwidth`` these two arms run on seeds in rounds (workers.search.rounds)
  until the primary metric is known that precisely.
* ``search.arms`` adds more fixed arms the same way, each a loss section of its own (its trial id is
  its name, its arm tag ``LISTED_ARM``). The confirmatory arm and these are one family judged
  against the baseline, each at ``alpha / k`` (workers.evidence.arms), and the seeds in rounds
  extend them all until every arm's interval is as narrow as asked.
* ``search.confirm_best`` (with ``baseline`` and a search space): once the search has ended, its
  best configuration on ``val`` is trained again, as a fixed arm, on as many fresh seeds as
  ``search.seeds`` (workers.search.rounds.confirm_seeds), and the baseline on those it lacks; best
  vs baseline is then judged on these trainings, which played no part in picking it.
* **Select on one split, judge on another.** Configurations are ranked on ``val`` (what Tune
  sees); when the dataset has a held-out ``test`` split, every completed training is also
  evaluated on it at its last epoch, and the evidence is computed on ``test`` only, so picking the
  best of several configurations on ``val`` does not inflate its comparison (the winner's curse).
* Every seed's child run is tagged with the trial's outcome: ``completed``, ``stopped`` by ASHA,
  or ``failed`` with its reason. At the end the parent run gets the evidence
  (:func:`workers.summary.log_summary`); ``hdet report`` renders the same from MLflow alone.

Resuming (``hdet run SPEC --resume``) restores the Tune experiment with ``Tuner.restore``:
finished trials are not run again, interrupted ones start again and their seeds resume from their
own Ray Train checkpoints (same run names), and seeds whose MLflow run already finished are
replayed from MLflow. Failed trials are re-run only when asked (``retry_failed``).

Ray, MLflow and torch are imported inside the functions: a trial process imports this module first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from workers import marks
from workers.env import TRAIN_ENV_DEFAULTS
from workers.search.rounds import (
    confirm_rule,
    confirm_seeds,
    first_round,
    rounds_rule,
    run_confirm_rounds,
    run_rounds,
    with_seeds,
)
from workers.search.seeds import TrialFailure, compute_metrics, run_key, short_reason, train_on_seeds
from workers.search.slots import start_training_slots
from workers.search.space import (
    TRIAL_CPUS,
    SearchSpaceError,
    make_scheduler,
    make_search_alg,
    num_trials,
    tune_param_space,
)
from workers.spec import Spec
from workers.summary import (
    BASELINE_ID,
    BEST_CONFIRMED_ID,
    CONFIRM_SEEDS_TAG,
    CONFIRMATORY_ID,
    LISTED_ARM,
    OBJECTIVE,
    ROUNDS_STOP_TAG,
    SEEDS_RUN_TAG,
    SearchSummary,
    collect_summary,
    log_summary,
)
from workers.tracking import Tag, find_child_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from workers.tracking import TrackingContext

__all__ = ["FIXED_ARMS", "TrialOutcome", "run_search"]

#: the arms trained outside the searcher: arm -> the overrides of the spec it trains.
FIXED_ARMS: dict[str, dict[str, Any]] = {BASELINE_ID: {"loss.kind": "standard"}, CONFIRMATORY_ID: {}}


def fixed_arm_overrides(spec: Spec, arm: str) -> dict[str, Any]:
    """The overrides of a fixed arm for ``spec``: the baseline also clears the loss parts the spec
    sets (``loss.cls``, ``loss.box``, ``loss.box_extra``), so it trains the detector's own loss; an
    arm of ``search.arms`` replaces the whole loss section by its own."""
    if spec.search is not None and arm in spec.search.arms:
        return {f"loss.{k}": v for k, v in spec.search.arms[arm].model_dump(mode="json").items()}
    parts = {f"loss.{p}": None for p in ("cls", "box", "box_extra") if getattr(spec.loss, p) is not None}
    return {**FIXED_ARMS[arm], **(parts if arm == BASELINE_ID else {})}


class TrialOutcome(NamedTuple):
    """How Tune saw a trial end."""

    status: str  # completed, stopped (by the scheduler), failed or incomplete
    error: str | None  # the failure's reason
    last: dict[str, Any]  # the trial's last reported result


def _search_trial(
    config: dict[str, Any],
    *,
    spec_data: dict[str, Any],
    ctx: Any,
    storage_path: str,
    resumed: bool = False,
    hub: Any = None,
    slots: Any = None,
) -> None:
    """The Tune function of one trial: one configuration on all seeds (:func:`train_on_seeds`)."""
    t_start = time.time()
    from ray import tune

    # A stopped trial aborts its trainers before it returns; Tune reuses this process for the next
    # trial only if that takes less than this (2 s by default).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    spec = Spec.parse(spec_data, check_paths=False)
    trial_id = tune.get_context().get_trial_id()
    marks.mark("trial_fn", trial_id, t=t_start)
    train_on_seeds(
        spec, config, trial_id=trial_id, arm="search", ctx=ctx, storage_path=storage_path, report=tune.report,
        t_start=t_start, replay=resumed, hub=hub, slots=slots,
    )  # fmt: skip


def _fixed_arm_task(
    spec_data: dict[str, Any],
    ctx: Any,
    storage_path: str,
    resumed: bool,
    hub: Any,
    arm: str,
    overrides: dict[str, Any] | None = None,
    slots: Any = None,
) -> dict[str, Any]:
    """An arm outside the searcher (a Ray task), on the seeds of ``spec_data``, never stopped early:
    the baseline (the standard loss), the confirmatory arm (the spec's own loss section), an arm of
    ``search.arms`` (its trial id is its name, its arm tag ``LISTED_ARM``), or the best
    configuration confirmed on fresh seeds (``overrides``: its configuration)."""
    spec = Spec.parse(spec_data, check_paths=False)
    listed = spec.search is not None and arm in spec.search.arms
    try:
        out = train_on_seeds(
            spec,
            fixed_arm_overrides(spec, arm) if overrides is None else overrides,
            trial_id=arm,
            arm=LISTED_ARM if listed else arm,
            ctx=ctx,
            storage_path=storage_path,
            replay=resumed,
            hub=hub,
            slots=slots,
        )
    except TrialFailure as e:
        return {"status": "failed", "error": str(e)}
    from workers.tracking import client

    c = client(ctx.tracking_uri)
    for seed in spec.search.seeds if spec.search else []:
        run = find_child_run(c, ctx, run_key(arm, seed))
        if run is not None:
            c.set_tag(run.info.run_id, Tag.TRIAL_STATUS, "completed")
    return {"status": "completed", "wall_s": out["trial_wall_s"]}


def _trial_outcomes(results: Any, epochs: int) -> dict[str, TrialOutcome]:
    """trial id -> its outcome, from Tune's results."""
    out: dict[str, TrialOutcome] = {}
    for trial in results._experiment_analysis.trials:
        last = dict(trial.last_result or {})
        if trial.status == "ERROR":
            err = None
            if trial.error_file and os.path.exists(trial.error_file):
                err = Path(trial.error_file).read_text().strip().splitlines()[-1]
            status, error = "failed", (err or "trial failed")
        elif trial.status == "TERMINATED":
            reached = int(last.get("epoch", 0) or 0)
            status, error = ("completed" if reached >= epochs else "stopped"), None
        else:
            status, error = "incomplete", None
        out[trial.trial_id] = TrialOutcome(status, error, last)
    return out


def _mark_trials(
    c: MlflowClient, ctx: TrackingContext, spec: Spec, outcomes: Mapping[str, TrialOutcome]
) -> None:
    """Write each trial's outcome on its child runs (and close runs an early stop left open)."""
    from workers.tracking import log_metrics

    assert spec.search is not None
    for trial_id, outcome in outcomes.items():
        status, error = outcome.status, outcome.error
        runs = [find_child_run(c, ctx, run_key(trial_id, seed)) for seed in spec.search.seeds]
        if status == "stopped" and all(
            r is not None
            and r.info.status == "FINISHED"
            and r.data.metrics.get("epoch", 0) >= spec.train.epochs
            for r in runs
        ):
            # Stopped by the scheduler on an earlier epoch's mean, after every seed had finished anyway.
            status = "completed"
        for run in runs:
            if run is None:
                continue
            run_id = run.info.run_id
            if status != "incomplete":
                c.set_tag(run_id, Tag.TRIAL_STATUS, status)
            if error and not run.data.tags.get(Tag.ERROR):
                c.set_tag(run_id, Tag.ERROR, error[:4000])
            if status == "stopped" and run.info.status == "RUNNING":
                c.set_terminated(run_id, status="KILLED")
            if status == "stopped" and "trial_wall_s" not in run.data.metrics:
                # the trial was ended by the scheduler before it could log its compute
                log_metrics(c, run_id, compute_metrics(outcome.last), step=0)


def _timeline_callbacks() -> list[Any]:
    """A Tune callback that marks each trial's start (:mod:`workers.marks`), when marks are kept."""
    if not marks.enabled():
        return []
    from ray import tune

    class TrialStartMarks(tune.Callback):  # type: ignore[misc]
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            marks.mark("trial_start", trial.trial_id)

    return [TrialStartMarks()]


def _start_train_coordinator() -> None:
    """Start Ray Train's autoscaling coordinator now rather than in the first trial's start.

    Every Train V2 run asks a cluster-wide coordinator (a detached actor, created by the first run
    that needs it) for its resources; creating it here lets its process start while Tune starts
    the trials. Ray-internal: if its place changes, the first run creates it as before. A Ray
    without an autoscaler (a local one) has no use for it: its runs do not ask it.
    """
    from workers import ray_compat
    from workers.env import ray_has_no_autoscaler

    if ray_has_no_autoscaler():
        return

    try:
        ray_compat.get_or_create_autoscaling_coordinator()()
    except Exception:  # pragma: no cover - depends on Ray's internals
        pass


def _confirm_best(
    spec: Spec,
    c: MlflowClient,
    ctx: TrackingContext,
    start_arms: Callable[[list[int], Mapping[str, Mapping[str, Any]]], None],
    wait_arms: Callable[[], dict[str, str | None]],
) -> None:
    """Train the best configuration (on ``val``) again on fresh seeds, and the baseline on those of
    them it has not trained (the rounds may have), so best vs baseline is judged on trainings that
    played no part in picking it (the parent run's ``CONFIRM_SEEDS_TAG`` names the seeds); with seeds
    in rounds, more fresh seeds until its interval reaches the target (:func:`run_confirm_rounds`)."""
    assert spec.search is not None
    found = collect_summary(c, ctx.experiment_id, ctx.parent_run_id, n_boot=1, history=False)
    best = found.best
    if best is None:
        print("confirm_best: no configuration completed the full schedule; nothing to confirm", flush=True)
        return

    # the seeds the baseline trained before the confirmation (each round's fresh seeds are new)
    base_seeds = found.baseline.per_seed if found.baseline is not None else {}

    def train_confirmation(fresh: list[int]) -> dict[str, str | None]:
        """The best configuration on ``fresh`` seeds, the baseline on those it lacks: arm -> failure."""
        missing = [s for s in fresh if base_seeds.get(s, {}).get("epoch", 0) < spec.train.epochs]
        print(
            f"confirm_best: trial {best.trial_id} on fresh seeds {fresh}, the baseline on {missing or 'them already'}",
            flush=True,
        )
        start_arms(fresh, {BEST_CONFIRMED_ID: best.params})
        if missing:
            start_arms(missing, {BASELINE_ID: fixed_arm_overrides(spec, BASELINE_ID)})
        started = {BEST_CONFIRMED_ID, *([BASELINE_ID] if missing else [])}
        failures: dict[str, str | None] = {
            arm: why for arm, why in wait_arms().items() if why and arm in started
        }
        for arm, why in failures.items():
            print(f"confirm_best: {arm} failed: {why}", flush=True)
        return failures

    fresh = confirm_seeds(spec)
    c.set_tag(ctx.parent_run_id, CONFIRM_SEEDS_TAG, json.dumps(fresh))
    if not train_confirmation(fresh) and confirm_rule(spec) is not None:
        run_confirm_rounds(spec, ctx, fresh, train_confirmation)


def run_search(
    spec: Spec,
    ctx: TrackingContext,
    storage_path: str,
    resume: bool = False,
    *,
    retry_failed: bool = False,
    verbose: int = 1,
    print_table: bool = True,
) -> SearchSummary:
    """Run (or resume) the Tune search of ``spec`` under the parent run ``ctx``; log the evidence.

    Args:
        spec: a spec with a ``search`` section.
        ctx: the experiment's tracking context (its parent run).
        storage_path: Ray Tune/Train storage; the Tune experiment is ``<spec.name>-search-<parent
            run id prefix>`` under it, so ``resume`` (same parent run) finds it again.
        resume: restore the interrupted search with ``Tuner.restore``; finished trials are kept.
        retry_failed: with ``resume``, run failed trials again.
        verbose: Tune's console verbosity (0-2).
        print_table: print the summary's table (:func:`workers.report.format_table`) at the end
            (the job log's last word).

    Returns:
        SearchSummary: also logged to the parent run (see :func:`workers.summary.log_summary`).
        ``complete`` is False when the search was interrupted (nothing is concluded then).

    Raises:
        SearchSpaceError: the search section cannot be run.
    """
    if spec.search is None:
        raise SearchSpaceError("search: the spec has no search section")
    from workers.training.controller_hooks import start_event_hub

    hub = start_event_hub()  # the trainers' reports reach their trials through it
    slots = start_training_slots(spec)  # trainings start as the cluster's room admits them
    try:
        return _run_search(
            spec, ctx, storage_path, resume, retry_failed=retry_failed, verbose=verbose,
            print_table=print_table, hub=hub, slots=slots,
        )  # fmt: skip
    finally:
        # Tune keeps its trials' parameters (these handles among them) to the end of the process:
        # without this, every search of a suite or a benchmark would leave both actors running.
        _stop_actors(hub, slots)


def _stop_actors(*actors: Any) -> None:
    """Kill ``actors`` (None: skipped); a Ray already shut down has none left to kill."""
    import ray

    for actor in actors:
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # Ray gone: nothing left to stop
                pass


def _run_search(
    spec: Spec,
    ctx: TrackingContext,
    storage_path: str,
    resume: bool,
    *,
    retry_failed: bool,
    verbose: int,
    print_table: bool,
    hub: Any,
    slots: Any,
) -> SearchSummary:
    """:func:`run_search` with its event hub and training slots started."""
    import ray
    from ray import tune

    from workers.tracking import client

    assert spec.search is not None  # (checked by run_search)
    for k, v in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    t0 = time.time()
    param_space = tune_param_space(spec)
    # An empty space is a comparison without a search: the fixed arms only (baseline, confirmatory).
    searching = bool(spec.search.space)
    c = client(ctx.tracking_uri)
    c.set_tag(ctx.parent_run_id, Tag.SEARCH_COMPLETE, "false")
    # The trials and the fixed arms get the spec as a plain dict (they parse it again).
    spec_data = spec.to_dict()
    _start_train_coordinator()
    trainable = tune.with_resources(
        tune.with_parameters(
            _search_trial,
            spec_data=spec_data,
            ctx=ctx,
            storage_path=storage_path,
            resumed=resume,
            hub=hub,
            slots=slots,
        ),  # fmt: skip
        {"CPU": TRIAL_CPUS},
    )
    name = f"{spec.name}-search-{ctx.parent_run_id[:8]}"
    exp_path = f"{storage_path.rstrip('/')}/{name}"
    tuner: Any = None
    if not searching:
        pass
    elif resume and tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(
            exp_path, trainable, resume_unfinished=True, resume_errored=False, restart_errored=retry_failed,
            param_space=param_space,
        )  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode="max",
                search_alg=make_search_alg(spec),
                scheduler=make_scheduler(spec),
                num_samples=num_trials(spec),
                reuse_actors=True,
            ),  # fmt: skip
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, verbose=verbose, callbacks=_timeline_callbacks()
            ),
        )

    arm_refs: dict[str, Any] = {}
    task = ray.remote(num_cpus=0, max_retries=0)(_fixed_arm_task)
    # the fixed arms' seeds in rounds (a search's confirmation has its own, _confirm_best)
    in_rounds = rounds_rule(spec) is not None
    first_seeds = first_round(spec)
    if in_rounds:
        c.set_tag(ctx.parent_run_id, SEEDS_RUN_TAG, json.dumps(first_seeds))

    # the baseline, then the arms judged against it (the confirmatory arm and search.arms)
    wanted_arms = [BASELINE_ID] if spec.search.baseline else []
    fixed_arms = {arm: fixed_arm_overrides(spec, arm) for arm in [*wanted_arms, *spec.search.compared_arms()]}

    def start_arms(seeds: list[int], arms: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Start each arm (default: the fixed arms the spec asks for) on ``seeds``: arm -> overrides."""
        data = with_seeds(spec_data, seeds)
        for arm, overrides in (fixed_arms if arms is None else arms).items():
            arm_refs[arm] = task.remote(data, ctx, storage_path, resume, hub, arm, dict(overrides), slots)

    def wait_arms() -> dict[str, str | None]:
        """arm -> why it failed (None: it completed)."""
        failures: dict[str, str | None] = {}
        for arm, ref in arm_refs.items():
            try:
                out = ray.get(ref)
                failures[arm] = out.get("error") if out.get("status") == "failed" else None
            except KeyboardInterrupt:
                raise
            except Exception as e:  # the arm's child runs say what happened; the search stands
                failures[arm] = short_reason(e)
                print(f"{arm}: {failures[arm]}", flush=True)
        return failures

    def train_round(seeds: list[int]) -> dict[str, str | None]:
        start_arms(seeds)
        return wait_arms()

    start_arms(first_seeds)
    outcomes: dict[str, TrialOutcome] = {}
    try:
        if tuner is not None:
            outcomes = _trial_outcomes(tuner.fit(), spec.train.epochs)
        _mark_trials(c, ctx, spec, outcomes)
        interrupted = searching and (any(o.status == "incomplete" for o in outcomes.values()) or not outcomes)
        if interrupted:
            for ref in arm_refs.values():
                ray.cancel(ref, force=True)
        else:
            failures = {arm: why for arm, why in wait_arms().items() if why}
            if in_rounds and failures:
                reason = "; ".join(f"{arm}: {why}" for arm, why in failures.items())
                c.set_tag(ctx.parent_run_id, ROUNDS_STOP_TAG, f"failed: {reason}"[:4000])
            elif in_rounds:
                run_rounds(spec, ctx, first_seeds, train_round)
            if searching and spec.search.baseline and spec.search.confirm_best:
                _confirm_best(spec, c, ctx, start_arms, wait_arms)
    except BaseException:
        for ref in arm_refs.values():
            ray.cancel(ref, force=True)
        raise

    if slots is not None:
        from workers.tracking import log_metrics

        stats = ray.get(slots.stats.remote())
        log_metrics(c, ctx.parent_run_id, {f"slots_{k}": float(stats[k]) for k in ("capacity", "peak", "expired")},
                    step=0)  # fmt: skip
    summary = collect_summary(c, ctx.experiment_id, ctx.parent_run_id, experiment=ctx.experiment)
    summary.complete = not interrupted
    summary.wall_s = time.time() - t0
    from workers.report import format_table, write_evidence

    log_summary(c, ctx.parent_run_id, summary, render=write_evidence)
    if print_table:
        print("\n" + format_table(summary), flush=True)
    return summary
