"""The Ray Tune search over the loss's hyperparameters, with seed-paired evidence against the baseline.

How a search runs (``run_search``):

* The spec's ``search.space`` becomes a Tune search space (:func:`tune_param_space`); keys are
  dotted spec paths (``loss.alpha``, ``train.lr``; a bare ``alpha`` means ``loss.alpha``).
  ``algorithm`` picks the searcher (:func:`make_search_alg`), ``scheduler`` FIFO or ASHA
  (:func:`make_scheduler`, one rung step per epoch).
* **Seeds are a blocking factor, not a hyperparameter.** One Tune trial is one configuration,
  and it trains that configuration on every seed of ``search.seeds``: one Ray Train
  ``TorchTrainer`` per seed, all started at once from inside the trial (Train V2 pattern: the
  trial is a Tune function that builds and fits trainers). Each trainer's per-epoch report reaches
  the trial through a :class:`~workers.controller_hooks.SeedReportCallback` (a ``ray.train.UserCallback``, like Tune's own
  ``TuneReportCallback``, which forwards one trainer's metrics as they are); when every seed has
  finished epoch ``k`` the trial reports the **seed mean** of the metrics for epoch ``k`` to Tune.
  So ASHA and TPE rank configurations by the seed-averaged AP, never by a lucky seed, and
  ASHA's early stop stops all seeds of a configuration together. Seeds run concurrently rather
  than one after the other because a sequential trial could only report epoch 1 of its mean
  after the last seed's epoch 1, i.e. near the end of the trial, which would leave ASHA nothing
  to stop. A seed whose training fails fails the configuration (its mean does not exist).
* ``search.baseline`` adds the standard loss (``loss.kind: standard``) on the same seeds with
  the same recipe and data order (``train.seed`` is the data-order seed), as a separate Ray task
  started next to the search: it is not a Tune trial, so no scheduler stops it early and no
  searcher learns from it. ``search.confirmatory`` adds, the same way, the spec's own ``loss``
  section (e.g. the paper's alpha 1.5, gamma 0.8, margin 0.2): a configuration fixed before the
  search, so its comparison with the baseline involves no selection.
* **Select on one split, judge on another.** Configurations are ranked on ``val`` (what Tune
  sees); when the dataset has a held-out ``test`` split, every completed training is also
  evaluated on it at its last epoch, and the evidence (confirmatory vs baseline, best vs
  baseline) is computed on ``test`` only, so picking the best of several configurations on
  ``val`` does not inflate its comparison (the winner's curse).
* Every seed's training is its own MLflow child run under the experiment's parent run, keyed
  ``<trial id>-seed<seed>`` (``baseline-seed<seed>`` for the baseline) so a retried or resumed
  trial finds its run again, and tagged with the trial id, the configuration, the seed and the
  trial's outcome (``completed``, ``stopped`` by ASHA, or ``failed`` with its reason).
* At the end the parent run gets the evidence (:func:`log_summary`): the best configuration;
  per-seed AP/AP50/AP75/AP90/AIC of it and of the baseline; paired differences with 95 %
  bootstrap intervals and a paired test (:mod:`workers.evidence`); the AP-vs-IoU curves of both
  and their difference; the sensitivity of AP to each parameter and the share of configurations
  within 0.5 AP of the best; and the compute of every trial. ``hdet report`` renders the same
  from MLflow alone.

Resuming (``hdet run SPEC --resume``) restores the Tune experiment with ``Tuner.restore``:
finished trials are not run again, interrupted ones start again and their seeds resume from
their own Ray Train checkpoints (same run names), and seeds whose MLflow run already finished
are replayed from MLflow instead of trained. Failed trials are re-run only when asked
(``retry_failed``).

The fixed cost of a trial (its start to its first training step) is mostly process start-up:
the Train controller and worker processes each import Ray Train (which imports pandas and Ray
Data) and torch. This module keeps what it controls small: it imports Ray, MLflow and torch only
inside functions (the trial process imports it first), Tune reuses trial processes
(``reuse_actors``), all seeds' trainers start together, and the Train controller polls its
workers every 0.25 s instead of every 2 s (:data:`TRAIN_ENV_DEFAULTS`). ``hdet bench search``
measures it.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers import timeline
from workers.env import TRAIN_ENV_DEFAULTS
from workers.evidence import aggregate_seeds, compare_metrics, sensitivity
from workers.spec import Spec, SpecError, resolve_param_path
from workers.tracking import find_child_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from workers.tracking import TrackingContext

__all__ = [
    "OBJECTIVE",
    "SearchSpaceError",
    "SearchSummary",
    "TrialRecord",
    "TRAIN_ENV_DEFAULTS",
    "tune_param_space",
    "make_search_alg",
    "make_scheduler",
    "run_configuration",
    "run_search",
    "collect_summary",
    "log_summary",
    "required_cpus",
]

#: the searched objective: COCO AP@[.5:.95] of the last epoch, mean over seeds (in [0, 1]).
OBJECTIVE = "AP"
#: metrics compared between an arm and the baseline (one table; Holm-corrected together).
COMPARED_METRICS = ("AP", "AP50", "AP75", "AP90", "aic")
#: the training-time mechanism: what the loss does to the positives' scores (Eq. 7).
MECHANISM_METRICS = (
    "train_aic",
    "train_mean_score",
    "train_pushed_down_share",
    "train_pushed_down_mean_score",
)
#: the per-epoch metrics a trial averages over its seeds and reports to Tune.
REPORTED_METRICS = (
    *COMPARED_METRICS,
    "spearman",
    *MECHANISM_METRICS,
    "loss",
    "images_per_s",
    *(f"ap_iou_{t}" for t in range(50, 100, 5)),
)
#: prefix of the held-out test split's metrics (see :mod:`workers.train`).
TEST_PREFIX = "test_"
#: "within 0.5 AP of the best", on the [0, 1] scale the trainer reports AP in.
NEAR_BEST = 0.005

BASELINE_ID = "baseline"
CONFIRMATORY_ID = "confirmatory"
TRIAL_TAG = "hdet.trial_id"
SEED_TAG = "hdet.seed"
ARM_TAG = "hdet.arm"
CONFIG_TAG = "hdet.config"
STATUS_TAG = "hdet.trial_status"
ERROR_TAG = "hdet.error"
SUMMARY_ARTIFACT = "evidence/summary.json"


class SearchSpaceError(ValueError):
    """A ``search`` section cannot be run; the message names the field."""


# --------------------------------------------------------------------------- search space


def _space_entry(name: str, entry: Any) -> tuple[str, list[Any]]:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise SearchSpaceError(
            f"search.space.{name}: must have exactly one of uniform, loguniform, choice, grid"
        )
    ((kind, values),) = entry.items()
    if kind not in ("uniform", "loguniform", "choice", "grid"):
        raise SearchSpaceError(
            f"search.space.{name}: unknown entry {kind!r}; use uniform, loguniform, choice or grid"
        )
    if not isinstance(values, list | tuple) or not values:
        raise SearchSpaceError(f"search.space.{name}.{kind}: must be a non-empty list, got {values!r}")
    return kind, list(values)


_NOT_SEARCHABLE = ("name", "search", "tracking", "train.seed", "scaling")


def tune_param_space(spec: Spec) -> dict[str, Any]:
    """The Tune ``param_space`` of a spec's ``search.space``.

    Entries: ``uniform: [lo, hi]`` -> ``tune.uniform``, ``loguniform: [lo, hi]`` ->
    ``tune.loguniform``, ``choice: [...]`` -> ``tune.choice``, ``grid: [...]`` ->
    ``tune.grid_search``. With ``algorithm: grid`` a ``choice`` is searched exhaustively too; with
    ``algorithm: optuna`` a ``grid`` entry becomes a categorical (TPE cannot enumerate a grid).
    With ``algorithm: random`` grid entries are crossed with ``num_samples`` random draws of the
    others (Tune's semantics).

    Every bound and every listed value is checked against the spec before anything runs, so a
    space that would produce an invalid spec (``gamma`` above 1, a float for an integer field)
    fails here, naming the entry.

    Args:
        spec: a spec with a ``search`` section.

    Returns:
        dict: dotted spec path -> Tune domain.

    Raises:
        SearchSpaceError: the spec has no search section, or an entry is unusable.
    """
    from ray import tune

    if spec.search is None:
        raise SearchSpaceError("search: the spec has no search section")
    algorithm = spec.search.algorithm
    space: dict[str, Any] = {}
    for name, entry in spec.search.space.items():
        try:
            path = resolve_param_path(name)
        except KeyError as e:
            raise SearchSpaceError(f"search.space.{name}: {e.args[0]}") from None
        if any(path == p or path.startswith(p + ".") for p in _NOT_SEARCHABLE):
            hint = " (seeds are set by search.seeds)" if path == "train.seed" else ""
            raise SearchSpaceError(f"search.space.{name}: {path} cannot be searched{hint}")
        if path in space:
            raise SearchSpaceError(f"search.space.{name}: {path} is listed twice")
        kind, values = _space_entry(name, entry)
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
            ):
                raise SearchSpaceError(f"search.space.{name}.{kind}: must be [lo, hi] numbers, got {values}")
            lo, hi = float(values[0]), float(values[1])
            if not lo < hi:
                raise SearchSpaceError(f"search.space.{name}.{kind}: lo must be < hi, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise SearchSpaceError(f"search.space.{name}.loguniform: lo must be > 0, got {lo}")
            if algorithm == "grid":
                raise SearchSpaceError(
                    f"search.space.{name}: algorithm grid cannot sample a {kind} range; use grid or choice"
                )
            # the bounds, and a point between them that is no integer (an int field cannot be sampled)
            _check_values(spec, name, path, kind, [lo, round(lo + 0.37 * (hi - lo), 6), hi])
            space[path] = tune.uniform(lo, hi) if kind == "uniform" else tune.loguniform(lo, hi)
        else:
            _check_values(spec, name, path, kind, values)
            if kind == "grid" and algorithm != "optuna" or kind == "choice" and algorithm == "grid":
                space[path] = tune.grid_search(values)
            else:
                space[path] = tune.choice(values)
    return space


def _check_values(spec: Spec, name: str, path: str, kind: str, values: list[Any]) -> None:
    for v in values:
        try:
            spec.with_overrides({path: v}, check_paths=False)
        except SpecError as e:
            problems = "; ".join(f"{p}: {m}" if p else m for p, m in e.problems)
            raise SearchSpaceError(
                f"search.space.{name}.{kind}: value {v!r} gives an invalid spec ({problems})"
            ) from None


def make_search_alg(spec: Spec) -> Any:
    """The Tune search algorithm of ``search.algorithm``, limited to ``search.max_concurrent`` trials.

    ``random`` and ``grid``: Tune's ``BasicVariantGenerator`` (seeded with ``train.seed``, so a
    search is reproducible); ``optuna``: ``OptunaSearch`` (TPE) in a ``ConcurrencyLimiter``.
    """
    assert spec.search is not None
    s = spec.search
    if s.algorithm in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=s.max_concurrent, random_state=spec.train.seed)
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=spec.train.seed), max_concurrent=s.max_concurrent)


def make_scheduler(spec: Spec) -> Any:
    """FIFO, or ASHA with one rung step per epoch (``time_attr="epoch"``, ``max_t = train.epochs``),
    ``search.grace_period`` and ``search.reduction_factor``.

    ASHA halves by default (``reduction_factor: 2``) rather than quarters: searches here are a few
    configurations of a few epochs, and keeping a quarter would stop almost everything after the
    first epoch, where AP is mostly noise; a longer ``grace_period`` waits for AP to mean something.
    """
    assert spec.search is not None
    if spec.search.scheduler == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        max_t=spec.train.epochs,
        grace_period=spec.search.grace_period,
        reduction_factor=spec.search.reduction_factor,
    )


def num_trials(spec: Spec) -> int:
    """``num_samples`` for Tune: 1 pass over the grid for ``algorithm: grid``."""
    assert spec.search is not None
    return 1 if spec.search.algorithm == "grid" else spec.search.num_samples


#: What a trial itself reserves: it only drives its trainers, which request the real resources;
#: Tune needs a non-empty request, and a tiny one lets the trainers have the whole CPU.
TRIAL_CPUS = 0.01


def required_cpus(spec: Spec) -> float:
    """CPUs that let every concurrently running trainer start at once: (``max_concurrent`` + the
    baseline + the confirmatory arm) configurations x seeds x workers x CPUs per worker, plus what the running trials
    reserve themselves (:data:`TRIAL_CPUS` each). With fewer, trainers queue for resources
    (correct, but a queued trainer's trial start then includes the wait, and ASHA sees each
    trial's seed mean later)."""
    s = spec.scaling
    per_trainer = s.num_workers * s.cpus_per_worker
    if spec.search is None:
        return per_trainer
    searched = spec.search.max_concurrent if spec.search.space else 0
    configs = searched + int(spec.search.baseline) + int(spec.search.confirmatory)
    return configs * len(spec.search.seeds) * per_trainer + searched * TRIAL_CPUS


# --------------------------------------------------------------------------- one configuration


class TrialFailure(RuntimeError):
    """A configuration failed on at least one seed; the message is the reason."""


def _run_key(trial_id: str, seed: int) -> str:
    return f"{trial_id}-seed{seed}"


def _history_from_mlflow(c: MlflowClient, run_id: str) -> dict[int, dict[str, float]]:
    """Per-epoch metrics of a finished child run (to replay a seed instead of training it again)."""
    history: dict[int, dict[str, float]] = {}
    for key in ("epoch", "epoch_time_s", *REPORTED_METRICS):
        for m in c.get_metric_history(run_id, key):
            history.setdefault(int(m.step), {})[key] = float(m.value)
    return {e: h for e, h in history.items() if "epoch" in h}


def _short_reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text}"[:2000]


def run_configuration(
    spec: Spec,
    overrides: Mapping[str, Any],
    *,
    trial_id: str,
    arm: str,
    ctx: TrackingContext,
    storage_path: str,
    report: Callable[[dict[str, Any]], None] | None = None,
    t_start: float | None = None,
    replay: bool = True,
    hub: Any = None,
) -> dict[str, Any]:
    """Train one configuration on every seed of ``spec.search.seeds`` at once; report seed means.

    Args:
        spec: the experiment spec (with its ``search`` section).
        overrides: dotted spec paths -> values of this configuration (e.g. ``{"loss.alpha": 1.2}``).
        trial_id: the Tune trial id (``baseline`` for the baseline); with the seed it keys the
            MLflow child runs and names the Ray Train runs.
        arm: ``search`` or ``baseline`` (an MLflow tag).
        ctx: the experiment's tracking context.
        storage_path: Ray Train storage.
        report: called once per epoch with the seed means (``tune.report`` in a trial).
        t_start: when the trial started (default: now); ``first_step_s`` counts from it.
        replay: look for seeds that finished before an interruption (a resumed search) and
            replay them from MLflow instead of training them; False skips that query.
        hub: the search's :class:`~workers.controller_hooks.EventHub` (default: one of this
            process's own).

    Returns:
        dict: ``epochs`` (per-seed history ``{seed: {epoch: metrics}}``) and the compute used
        (``wall_s``, ``cpu_s``, ``gpu_s``, ``first_step_s``).

    Raises:
        TrialFailure: a seed's spec is invalid or its training failed; the message says which
            and why. The seeds' child runs are marked failed with the reason.
    """
    t_start = time.time() if t_start is None else t_start
    if hub is None:
        hub = _event_hub()
    from workers.controller_hooks import SeedReportCallback
    from workers.tracking import client, find_or_create_child_run, log_metrics, log_missing_epochs, run_tags
    from workers.train import make_trainer, prepare_child_run, resolve_use_gpu

    assert spec.search is not None
    for k, v in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    seeds = list(spec.search.seeds)
    config_json = json.dumps(dict(overrides), sort_keys=True, default=str)
    base = spec.model_copy(update={"search": None})

    def tags_for(seed: int) -> dict[str, str]:
        return {TRIAL_TAG: trial_id, SEED_TAG: str(seed), ARM_TAG: arm, CONFIG_TAG: config_json[:5000]}

    def name_of(seed: int) -> str:
        # The Ray Train run's name (the same after an interruption: Ray Train then resumes it from
        # its checkpoint) and the MLflow child run's.
        return f"{spec.name}-{ctx.parent_run_id[:8]}-{_run_key(trial_id, seed)}"

    seed_specs: dict[int, Spec] = {}
    for seed in seeds:
        try:
            seed_specs[seed] = base.with_overrides({**overrides, "train.seed": seed}, check_paths=False)
        except SpecError as e:
            reason = f"invalid configuration {config_json}: " + "; ".join(f"{p}: {m}" for p, m in e.problems)
            mc = client(ctx.tracking_uri)
            for s in seeds:
                tags = {**run_tags(base, "child"), **tags_for(s)}
                run_id = find_or_create_child_run(ctx, _run_key(trial_id, s), name_of(s), tags)
                mc.set_tag(run_id, STATUS_TAG, "failed")
                mc.set_tag(run_id, ERROR_TAG, reason[:4000])
                mc.set_terminated(run_id, status="FAILED")
            raise TrialFailure(reason) from None

    sc = spec.scaling
    use_gpu = resolve_use_gpu(spec)
    per_trainer_cpus = sc.num_workers * sc.cpus_per_worker
    per_trainer_gpus = sc.num_workers * sc.gpus_per_worker if use_gpu else 0.0

    history: dict[int, dict[int, dict[str, float]]] = {seed: {} for seed in seeds}
    started: dict[int, float] = {}
    ended: dict[int, float] = {}
    first_step: dict[int, float] = {}
    threads: list[threading.Thread] = []
    run_ids: dict[int, str] = {}
    keys = {_run_key(trial_id, seed): seed for seed in seeds}
    trainers: dict[int, Any] = {}
    lock = threading.Lock()
    stopping = threading.Event()

    rc: Any = client(ctx.tracking_uri) if replay else None

    def run_id_of(seed: int) -> str:
        """The seed's child run: its trainer's rank-0 worker creates it (``defer_run``)."""
        if seed not in run_ids:
            run_ids[seed] = trainers[seed].child_run_id() if seed in trainers else prepare_child_run(
                ctx, seed_specs[seed], run_key=_run_key(trial_id, seed), run_name=name_of(seed),
                tags={**tags_for(seed), STATUS_TAG: "running"},
            )  # fmt: skip
        return run_ids[seed]

    for seed in seeds:
        key = _run_key(trial_id, seed)
        existing = find_child_run(rc, ctx, key) if replay else None
        if existing is not None and existing.info.status == "FINISHED":
            # Finished before an interruption: replay it from MLflow instead of training again.
            run_ids[seed] = existing.info.run_id
            history[seed] = _history_from_mlflow(rc, existing.info.run_id)
            started[seed] = ended[seed] = time.time()
            continue

        def fit(seed: int = seed, key: str = key) -> None:
            started[seed] = time.time()
            try:
                trainer = make_trainer(
                    seed_specs[seed], run_name=name_of(seed), storage_path=storage_path, tracking=ctx,
                    callbacks=[SeedReportCallback(hub, key)], run_key=key,
                    tags={**tags_for(seed), STATUS_TAG: "running"}, defer_run=True,
                )  # fmt: skip
                with lock:
                    if stopping.is_set():
                        trainer.close_mlflow_run("KILLED")
                        raise RuntimeError("the trial was stopped before this seed started")
                    trainers[seed] = trainer
                timeline.mark("trainer_fit", key=key)
                trainer.fit()
            except BaseException as e:  # reported to the trial, which fails the configuration
                hub.put.remote(("failed", key, _short_reason(e), time.time()))
            else:
                hub.put.remote(("done", key, None, time.time()))

        threads.append(threading.Thread(target=fit, name=f"hdet-{key}", daemon=True))
    for th in threads:
        th.start()

    pending = {seed for seed in seeds if seed not in ended}
    next_epoch = 1
    failure: str | None = None

    def compute(now: float) -> dict[str, float]:
        busy = sum(ended.get(sd, now) - started[sd] for sd in started)
        fs = [first_step[sd] - t_start for sd in first_step]
        return {
            "trial_wall_s": now - t_start,
            "cpu_s": busy * per_trainer_cpus,
            "gpu_s": busy * per_trainer_gpus,
            "first_step_s": min(fs) if fs else float("nan"),
            "epochs_run": float(sum(len(h) for h in history.values())),
        }

    def flush() -> None:
        nonlocal next_epoch
        while all(next_epoch in history[sd] for sd in seeds):
            if next_epoch >= spec.train.epochs and pending:
                # The last epoch is reported only once every trainer has returned: the scheduler
                # ends the trial at max_t, which would cut the trainers' final logging short.
                return
            per_seed = {sd: history[sd][next_epoch] for sd in seeds}
            agg = aggregate_seeds(
                {sd: {k: m[k] for k in REPORTED_METRICS if k in m} for sd, m in per_seed.items()}
            )
            row: dict[str, Any] = {k: v["mean"] for k, v in agg.items()}
            row[f"{OBJECTIVE}_std"] = agg.get(OBJECTIVE, {}).get("std", float("nan"))
            for sd, m in per_seed.items():
                row[f"{OBJECTIVE}_seed{sd}"] = m.get(OBJECTIVE, float("nan"))
            row.update(compute(time.time()))
            row["epoch"] = next_epoch  # (no "done" key: Tune would end the trial on it)
            if report is not None:
                report(row)  # raises SystemExit when the scheduler stops the trial
            next_epoch += 1

    def stop_trainers() -> None:
        """Abort the trainers still running and give their child runs the epochs they reported."""
        with lock:
            stopping.set()
            running = [trainers[sd] for sd in pending if sd in trainers]
        refs = [r for r in (t.abort_async() for t in running) if r is not None]
        deadline = time.time() + 30.0
        if refs:
            import ray

            ray.wait(refs, num_returns=len(refs), timeout=30.0)
        # Each seed's fit thread closes its child run (KILLED) once its controller is gone: wait for
        # that, so that no run is left RUNNING when the trial returns (Tune may reuse the process).
        for th in threads:
            th.join(timeout=max(0.0, deadline - time.time()))
        c = client(ctx.tracking_uri)
        for sd in pending:
            # A worker logs an epoch to MLflow just after reporting it; the abort may have come
            # in between. The trial has the report: log what the child run lacks.
            log_missing_epochs(c, run_id_of(sd), history[sd])

    def record_compute(failure: str | None) -> None:
        used = compute(time.time())
        c = client(ctx.tracking_uri)
        for seed in seeds:
            run_id = run_id_of(seed)
            metrics = {f"trial_{k}" if not k.startswith("trial_") else k: v for k, v in used.items()}
            metrics["trainer_wall_s"] = ended.get(seed, time.time()) - started.get(seed, t_start)
            log_metrics(c, run_id, metrics, step=0)
            if failure is not None:
                c.set_tag(run_id, STATUS_TAG, "failed")
                c.set_tag(run_id, ERROR_TAG, failure[:4000])
                if c.get_run(run_id).info.status == "RUNNING":
                    c.set_terminated(run_id, status="FAILED" if f"seed {seed}:" in failure else "KILLED")

    import ray

    def take() -> list[tuple[Any, ...]]:
        return list(ray.get(hub.take.remote(list(keys), 10.0)))

    try:
        flush()  # every seed replayed from MLflow
        while pending and failure is None:
            for kind, key, payload, at in take():
                seed = keys[key]
                if seed not in pending:
                    continue
                if kind == "report":
                    epoch = int(payload["epoch"])
                    history[seed][epoch] = {k: float(v) for k, v in payload.items() if _is_number(v)}
                    if seed not in first_step and "epoch_time_s" in payload:
                        # the first epoch started epoch_time_s before its report (an upper bound on
                        # the start of the first step: the report reaches us one controller poll later)
                        first_step[seed] = at - float(payload["epoch_time_s"])
                    flush()
                else:
                    ended[seed] = at
                    pending.discard(seed)
                    if kind == "failed":
                        failure = f"seed {seed}: {payload}"
                        break
    except BaseException:
        # Stopped by the scheduler (tune.report raised SystemExit) or torn down: the trainers must
        # not train on in this process, which Tune may reuse for the next trial.
        stop_trainers()
        record_compute(None)
        raise
    if failure is not None:
        stop_trainers()  # the configuration failed: its other seeds would only waste compute
        record_compute(failure)
        raise TrialFailure(failure)
    record_compute(None)
    flush()
    return {"history": history, **compute(time.time())}


#: This process's event hub, for run_configuration() called outside a search.
_HUB: Any = None


def _event_hub() -> Any:
    global _HUB
    from workers.controller_hooks import start_event_hub

    if _HUB is None:
        _HUB = start_event_hub()
    return _HUB


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def _search_trial(
    config: dict[str, Any],
    *,
    spec_data: dict[str, Any],
    ctx: Any,
    storage_path: str,
    resumed: bool = False,
    hub: Any = None,
) -> None:
    """The Tune function of one trial: one configuration on all seeds (see the module docstring)."""
    t_start = time.time()
    from ray import tune

    # A stopped trial aborts its trainers before it returns; Tune reuses this process for the next
    # trial only if that takes less than this (2 s by default).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    spec = Spec.parse(spec_data, check_paths=False)
    trial_id = tune.get_context().get_trial_id()
    timeline.mark("trial_fn", key=trial_id, t=t_start)
    run_configuration(
        spec, config, trial_id=trial_id, arm="search", ctx=ctx, storage_path=storage_path, report=tune.report,
        t_start=t_start, replay=resumed, hub=hub,
    )  # fmt: skip


#: the arms trained outside the searcher: arm -> the overrides of the spec it trains.
FIXED_ARMS: dict[str, dict[str, Any]] = {BASELINE_ID: {"loss.kind": "standard"}, CONFIRMATORY_ID: {}}


def _fixed_arm_task(
    spec_data: dict[str, Any], ctx: Any, storage_path: str, resumed: bool, hub: Any, arm: str
) -> dict[str, Any]:
    """An arm outside the searcher (a Ray task), on the same seeds, never stopped early: the
    baseline (the standard loss) or the confirmatory arm (the spec's own loss section)."""
    spec = Spec.parse(spec_data, check_paths=False)
    try:
        out = run_configuration(
            spec,
            FIXED_ARMS[arm],
            trial_id=arm,
            arm=arm,
            ctx=ctx,
            storage_path=storage_path,
            replay=resumed,
            hub=hub,
        )
    except TrialFailure as e:
        return {"status": "failed", "error": str(e)}
    from workers.tracking import client

    c = client(ctx.tracking_uri)
    for seed in spec.search.seeds if spec.search else []:
        run = find_child_run(c, ctx, _run_key(arm, seed))
        if run is not None:
            c.set_tag(run.info.run_id, STATUS_TAG, "completed")
    return {"status": "completed", "wall_s": out["trial_wall_s"]}


# --------------------------------------------------------------------------- summary


@dataclass
class TrialRecord:
    """One configuration of a search (or the baseline), as MLflow holds it.

    Attributes:
        trial_id: the Tune trial id, ``baseline`` or ``confirmatory``.
        arm: ``search``, ``baseline`` or ``confirmatory``.
        params: the configuration (dotted spec path -> value).
        status: ``completed``, ``stopped`` (early, by ASHA), ``failed`` or ``incomplete``.
        error: the failure's reason.
        epochs: the last epoch every seed reached.
        objective: mean over seeds of the last epoch's AP (in [0, 1]); None without all seeds.
        objective_std: standard deviation of it over seeds.
        per_seed: seed -> the last epoch's metrics.
        child_runs: seed -> MLflow run id.
        wall_s, cpu_s, gpu_s: the trial's wall time and allocated CPU/GPU-seconds.
        first_step_s: wall time from the trial's start to its first training step.
        epochs_run: epochs trained over all seeds.
    """

    trial_id: str
    arm: str
    params: dict[str, Any]
    status: str
    error: str | None = None
    epochs: int = 0
    objective: float | None = None
    objective_std: float | None = None
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)
    child_runs: dict[int, str] = field(default_factory=dict)
    wall_s: float = float("nan")
    cpu_s: float = float("nan")
    gpu_s: float = float("nan")
    first_step_s: float = float("nan")
    epochs_run: int = 0

    def seed_mean(self, metric: str) -> float:
        vals = [m[metric] for m in self.per_seed.values() if metric in m]
        return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class SearchSummary:
    """The outcome of a search, as logged to the parent run (``evidence/summary.json``).

    Attributes:
        experiment, parent_run_id: where it is in MLflow.
        objective: the searched metric (``AP``).
        seeds, algorithm, scheduler, epochs: what was run.
        trials: every configuration of the search.
        baseline: the baseline arm, if the spec asked for it.
        confirmatory: the confirmatory arm (the spec's own loss section), if asked for.
        best_trial_id: the best configuration (on ``val``) that trained the full schedule.
        comparison: metric -> :func:`workers.evidence.compare_metrics` entry of best vs baseline,
            on the split ``judged_on``.
        confirmatory_comparison: the same for the confirmatory arm vs the baseline.
        judged_on: ``test`` (the held-out split) or ``val`` (no test split: the best
            configuration's comparison then carries the winner's curse).
        mechanism: arm label -> training-time metric (:data:`MECHANISM_METRICS`) -> {epoch: mean
            over seeds}: what the loss did to the positives' scores, epoch by epoch.
        sensitivity: :func:`workers.evidence.sensitivity` over the completed configurations.
        ap_vs_iou: arm label -> {IoU threshold: AP, mean over seeds}.
        complete: False when the search was interrupted (resume it with ``--resume``).
        wall_s: wall time of the whole search (this session).
    """

    experiment: str
    parent_run_id: str
    objective: str
    seeds: list[int]
    algorithm: str
    scheduler: str
    epochs: int
    trials: list[TrialRecord]
    baseline: TrialRecord | None = None
    confirmatory: TrialRecord | None = None
    best_trial_id: str | None = None
    comparison: dict[str, dict[str, Any]] = field(default_factory=dict)
    confirmatory_comparison: dict[str, dict[str, Any]] = field(default_factory=dict)
    judged_on: str = "val"
    mechanism: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    ap_vs_iou: dict[str, dict[float, float]] = field(default_factory=dict)
    complete: bool = True
    wall_s: float = float("nan")

    @property
    def best(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.trial_id == self.best_trial_id), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (seeds and IoU thresholds become string keys)."""
        d = asdict(self)
        return json.loads(json.dumps(d, default=str, allow_nan=True))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSummary:
        def rec(r: Mapping[str, Any] | None) -> TrialRecord | None:
            if r is None:
                return None
            r = dict(r)
            r["per_seed"] = {int(k): v for k, v in r.get("per_seed", {}).items()}
            r["child_runs"] = {int(k): v for k, v in r.get("child_runs", {}).items()}
            return TrialRecord(**r)

        data = dict(d)
        data["trials"] = [rec(t) for t in data.get("trials", [])]
        data["baseline"] = rec(data.get("baseline"))
        data["confirmatory"] = rec(data.get("confirmatory"))
        data["ap_vs_iou"] = {
            k: {float(t): v for t, v in c.items()} for k, c in data.get("ap_vs_iou", {}).items()
        }
        data["mechanism"] = {
            arm: {m: {int(e): v for e, v in by_epoch.items()} for m, by_epoch in metrics.items()}
            for arm, metrics in data.get("mechanism", {}).items()
        }
        for table in ("comparison", "confirmatory_comparison"):
            for comp in data.get(table, {}).values():
                comp["per_seed"] = {
                    int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in comp["per_seed"].items()
                }
        return cls(**data)

    def format_table(self) -> str:
        """The comparison table printed at the end of a search (AP in points)."""
        lines: list[str] = []
        n = len(self.trials)
        counts = {
            s: sum(t.status == s for t in self.trials)
            for s in ("completed", "stopped", "failed", "incomplete")
        }
        done = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        lines.append(
            f"search: {n} configurations x {len(self.seeds)} seeds ({done}); "
            f"{self.algorithm} + {self.scheduler}, {self.epochs} epochs"
        )
        if not self.complete:
            lines.append("INTERRUPTED: resume with `hdet run SPEC --resume`")
        best, base = self.best, self.baseline
        if best is not None:
            params = ", ".join(f"{k}={_fmt_value(v)}" for k, v in best.params.items())
            lines.append(f"best configuration: {params}  (trial {best.trial_id})")
        tables = (
            ("confirmatory (the spec's loss)", "confirm.", "HarmonicDet (confirmatory)", self.confirmatory_comparison),
            ("best", "best", "HarmonicDet (best)", self.comparison),
        )  # fmt: skip
        if base is not None and any(table for *_, table in tables):
            for title, column, label, table in tables:
                if table:
                    lines.append("")
                    lines.append(
                        f"{title} vs baseline (standard loss) on the {self.judged_on} split, "
                        f"paired over seeds {self.seeds}:"
                    )
                    lines.extend(_comparison_lines(table, column, label, self.objective))
            if self.comparison and self.judged_on != "test":
                lines.append(
                    "caution: the best configuration was selected on the split it is judged on; its difference "
                    "is biased upwards (the winner's curse)."
                )
            sens = self.sensitivity
            if sens.get("n_configs"):
                lines.append(
                    f"{sens['n_within']} of {sens['n_configs']} completed configurations are within "
                    f"{100 * sens['tolerance']:.1f} AP of the best ({100 * sens['share_within']:.0f}%)"
                )
        elif base is not None and base.status == "failed":
            lines.append(f"baseline failed: {base.error}")
        lines.append("")
        lines.append(
            f"{'trial':<18}{'status':<11}{'AP':>7}{'±':>6}{'epochs':>7}{'wall s':>8}{'CPU s':>9}{'start s':>8}  config"
        )
        rows = [*self.trials, *(a for a in (self.confirmatory, base) if a is not None)]
        for t in rows:
            ap = f"{100 * t.objective:.1f}" if t.objective is not None else "-"
            sd = f"{100 * t.objective_std:.1f}" if t.objective_std is not None else "-"
            cfg = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt_value(v)}" for k, v in t.params.items())
            if t.status == "failed" and t.error:
                cfg = f"{cfg}  [{t.error[:80]}]"
            lines.append(
                f"{t.trial_id:<18}{t.status:<11}{ap:>7}{sd:>6}{t.epochs:>7}{_num(t.wall_s):>8}{_num(t.cpu_s):>9}"
                f"{_num(t.first_step_s, 1):>8}  {cfg}"
            )
        return "\n".join(lines)


def _num(v: float, digits: int = 0) -> str:
    return f"{v:.{digits}f}" if v is not None and math.isfinite(v) else "-"


def _fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _comparison_lines(
    comparison: Mapping[str, Mapping[str, Any]], column: str, label: str, primary: str
) -> list[str]:
    """One comparison table (one Holm family): per metric both arms' mean ± sd, diff, n, test, raw and
    Holm-adjusted p, the interval named by its method, the verdict; then the method and the verdict
    sentence on ``primary``. ``column`` heads the treatment's column, ``label`` names it in words."""
    from workers import evidence

    def pv(p: float) -> str:
        return f"{p:.3g}" if math.isfinite(p) else "-"

    head = (
        f"{'metric':<8}{column:>15}{'baseline':>15}{'diff':>8}{'n':>4}  {'test':<9}{'p':>9}{'p adj':>9}"
        f"  {evidence.interval_header(comparison):<20}  verdict"
    )
    lines = [head, "-" * (len(head) + len(evidence.NO_DIFFERENCE) - len("verdict"))]
    for metric, comp in comparison.items():
        scale, digits = (100.0, 1) if metric.startswith("AP") else (1.0, 3)
        fmt = f"{{:.{digits}f}}"
        b = _mean_sd(comp, "treatment", scale, fmt)
        a = _mean_sd(comp, "baseline", scale, fmt)
        diff = f"{scale * comp['mean_diff']:+.{digits}f}"
        ci = evidence.interval_cell(comparison, metric, scale, digits)
        p, p_adj = comp["p_value"], comp.get("p_adjusted", float("nan"))
        lines.append(
            f"{metric:<8}{b:>15}{a:>15}{diff:>8}{comp.get('n_pairs', '-'):>4}  {comp['test']:<9}"
            f"{pv(p):>9}{pv(p_adj):>9}  {ci:<20}  {comp.get('verdict', evidence.NO_DIFFERENCE)}"
        )
    lines.append(evidence.method_note(comparison))
    main = primary if primary in comparison else next(iter(comparison))
    sentence = evidence.verdict_sentence(comparison, label, "the standard-loss baseline", primary=main)
    lines.append(f"verdict: {sentence}")
    return lines


def _mean_sd(comp: Mapping[str, Any], arm: str, scale: float, fmt: str) -> str:
    """One arm's mean ± sd over the paired seeds of a comparison (the compared split's values)."""
    from workers.evidence import arm_mean_sd

    mean, sd = arm_mean_sd(comp, arm)
    if not math.isfinite(mean):
        return "-"
    return f"{fmt.format(scale * mean)} ± {fmt.format(scale * sd) if math.isfinite(sd) else '-'}"


def collect_summary(
    c: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    *,
    experiment: str = "",
    n_boot: int = 10000,
) -> SearchSummary:
    """Rebuild a search's summary from MLflow alone: the parent run and its child runs.

    Args:
        c: an MLflow client of the tracking server.
        experiment_id: the MLflow experiment.
        parent_run_id: the search's parent run.
        experiment: the experiment's name (for display).
        n_boot: bootstrap resamples of the paired comparison.

    Returns:
        SearchSummary: every trial found (grouped by the ``hdet.trial_id`` tag of the child
        runs), the best completed configuration, the paired comparison with the baseline, the
        sensitivity, and the AP-vs-IoU curves.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    parent = c.get_run(parent_run_id)
    p = parent.data.params
    epochs = int(p.get("train.epochs", "0") or 0)
    seeds = json.loads(p.get("search.seeds", "[]") or "[]")
    children: list[Any] = []
    token = None
    while True:
        page = c.search_runs(
            [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
            max_results=1000, page_token=token,
        )  # fmt: skip
        children.extend(page)
        token = page.token
        if not token:
            break
    groups: dict[str, list[Any]] = {}
    for run in children:
        tid = run.data.tags.get(TRIAL_TAG)
        if tid:
            groups.setdefault(tid, []).append(run)
    records: list[TrialRecord] = []
    fixed: dict[str, TrialRecord] = {}
    for tid, runs in groups.items():
        rec = _record(tid, runs, seeds, epochs)
        if rec.arm in FIXED_ARMS:
            fixed[rec.arm] = rec
        else:
            records.append(rec)
    records.sort(key=lambda r: r.trial_id)
    baseline, confirmatory = fixed.get(BASELINE_ID), fixed.get(CONFIRMATORY_ID)

    completed = [r for r in records if r.status == "completed" and r.objective is not None]
    best = max(completed, key=lambda r: r.objective or -1.0, default=None)
    # Judge on the held-out test split when every arm compared has it on every seed.
    arms = [a for a in (best, confirmatory, baseline) if a is not None]
    on_test = bool(arms) and all(_has_test(a, seeds) for a in arms)
    prefix = TEST_PREFIX if on_test else ""
    comparison: dict[str, dict[str, Any]] = {}
    confirmatory_comparison: dict[str, dict[str, Any]] = {}
    if baseline is not None and baseline.per_seed:
        base_metrics = _split_metrics(baseline, prefix)
        if best is not None:
            comparison = compare_metrics(
                _split_metrics(best, prefix), base_metrics, COMPARED_METRICS, n_boot=n_boot
            )
        if confirmatory is not None and confirmatory.per_seed:
            confirmatory_comparison = compare_metrics(
                _split_metrics(confirmatory, prefix), base_metrics, COMPARED_METRICS, n_boot=n_boot
            )
    sens = sensitivity(
        [{"params": r.params, "objective": r.objective} for r in completed],
        params=_searched_params(records),
        tolerance=NEAR_BEST,
    )
    curves: dict[str, dict[float, float]] = {}
    labelled: tuple[tuple[str, TrialRecord | None], ...] = (
        ("confirmatory (harmonic)", confirmatory),
        ("best (harmonic)", best),
        ("baseline (standard)", baseline),
    )
    for label, arm in labelled:
        if arm is None:
            continue
        curve = {}
        for t in range(50, 100, 5):
            v = arm.seed_mean(f"{prefix}ap_iou_{t}")
            if math.isfinite(v):
                curve[t / 100] = v
        if curve:
            curves[label] = curve
    mechanism = {label: _epoch_means(c, arm) for label, arm in labelled if arm is not None and arm.child_runs}
    return SearchSummary(
        experiment=experiment or parent.data.tags.get("hdet.spec_name", ""),
        parent_run_id=parent_run_id,
        objective=OBJECTIVE,
        seeds=[int(s) for s in seeds],
        algorithm=p.get("search.algorithm", ""),
        scheduler=p.get("search.scheduler", ""),
        epochs=epochs,
        trials=records,
        baseline=baseline,
        confirmatory=confirmatory,
        best_trial_id=best.trial_id if best else None,
        comparison=comparison,
        confirmatory_comparison=confirmatory_comparison,
        judged_on="test" if on_test else "val",
        mechanism={k: v for k, v in mechanism.items() if v},
        sensitivity=sens,
        ap_vs_iou=curves,
        complete=parent.data.tags.get("hdet.search_complete", "true") == "true",
    )


def _epoch_means(c: MlflowClient, rec: TrialRecord) -> dict[str, dict[int, float]]:
    """Mean over an arm's seeds of each :data:`MECHANISM_METRICS` metric, per epoch."""
    out: dict[str, dict[int, float]] = {}
    for key in MECHANISM_METRICS:
        values: dict[int, list[float]] = {}
        for run_id in rec.child_runs.values():
            for m in c.get_metric_history(run_id, key):
                if math.isfinite(m.value):
                    values.setdefault(int(m.step), []).append(float(m.value))
        if values:
            out[key] = {e: sum(v) / len(v) for e, v in sorted(values.items())}
    return out


def _has_test(rec: TrialRecord, seeds: list[int]) -> bool:
    return bool(seeds) and all(f"{TEST_PREFIX}{OBJECTIVE}" in rec.per_seed.get(s, {}) for s in seeds)


def _split_metrics(rec: TrialRecord, prefix: str) -> dict[int, dict[str, float]]:
    """Per-seed metrics of one split: ``test_AP`` -> ``AP`` with ``prefix="test_"``; the split's
    metrics only (never the other split's value under the same name)."""
    if not prefix:
        return {
            s: {k: v for k, v in m.items() if not k.startswith(TEST_PREFIX)} for s, m in rec.per_seed.items()
        }
    return {
        s: {k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)}
        for s, m in rec.per_seed.items()
    }


def _searched_params(records: list[TrialRecord]) -> list[str]:
    names: list[str] = []
    for r in records:
        for k, v in r.params.items():
            if k not in names and isinstance(v, int | float) and not isinstance(v, bool):
                names.append(k)
    return names


_RECORDED = frozenset(
    {
        *REPORTED_METRICS,
        "epoch",
        "AR100",
        "inconsistent_share",
        "nms_rate",
        "trainer_wall_s",
        *(f"{TEST_PREFIX}{m}" for m in (*COMPARED_METRICS, "spearman", "AR100", "inconsistent_share")),
        *(f"{TEST_PREFIX}ap_iou_{t}" for t in range(50, 100, 5)),
    }
)


def _record(trial_id: str, runs: list[Any], seeds: list[int], epochs: int) -> TrialRecord:
    tags = runs[0].data.tags
    params = json.loads(tags.get(CONFIG_TAG, "{}") or "{}")
    per_seed: dict[int, dict[str, float]] = {}
    child_runs: dict[int, str] = {}
    statuses, errors, reached = [], [], []
    compute: dict[str, float] = {}
    for run in runs:
        seed = int(run.data.tags.get(SEED_TAG, "-1"))
        child_runs[seed] = run.info.run_id
        m = dict(run.data.metrics)
        per_seed[seed] = {k: v for k, v in m.items() if k in _RECORDED}
        reached.append(int(m.get("epoch", 0)))
        statuses.append(run.data.tags.get(STATUS_TAG) or _status_of(run, epochs))
        if run.data.tags.get(ERROR_TAG):
            errors.append(f"seed {seed}: {run.data.tags[ERROR_TAG]}")
        for k in ("trial_wall_s", "trial_cpu_s", "trial_gpu_s", "trial_first_step_s", "trial_epochs_run"):
            if k in m:
                compute[k] = max(compute.get(k, float("-inf")), m[k])
    if "failed" in statuses:
        status = "failed"
    elif "stopped" in statuses:
        status = "stopped"
    elif all(s == "completed" for s in statuses) and (not seeds or set(per_seed) >= set(seeds)):
        status = "completed"
    else:
        status = "incomplete"
    have_all = bool(seeds) and set(seeds) <= set(per_seed) and all(OBJECTIVE in per_seed[s] for s in seeds)
    agg = aggregate_seeds(
        {s: {OBJECTIVE: per_seed[s][OBJECTIVE]} for s in seeds if s in per_seed and OBJECTIVE in per_seed[s]}
    )
    return TrialRecord(
        trial_id=trial_id,
        arm=tags.get(ARM_TAG, "search"),
        params=params,
        status=status,
        error="; ".join(errors)[:2000] or None,
        epochs=min(reached) if reached else 0,
        objective=agg[OBJECTIVE]["mean"] if have_all else None,
        objective_std=agg[OBJECTIVE]["std"] if have_all else None,
        per_seed=per_seed,
        child_runs=child_runs,
        wall_s=compute.get("trial_wall_s", float("nan")),
        cpu_s=compute.get("trial_cpu_s", float("nan")),
        gpu_s=compute.get("trial_gpu_s", float("nan")),
        first_step_s=compute.get("trial_first_step_s", float("nan")),
        epochs_run=int(compute.get("trial_epochs_run", sum(reached))),
    )


def _status_of(run: Any, epochs: int) -> str:
    if run.info.status == "FAILED":
        return "failed"
    if run.info.status == "FINISHED" and int(run.data.metrics.get("epoch", 0)) >= epochs:
        return "completed"
    return "incomplete"


def log_summary(c: MlflowClient, parent_run_id: str, summary: SearchSummary) -> None:
    """Log a summary's evidence to the parent run: metrics, the best configuration, plots, JSON, report.

    Metrics (step 0): ``best_<m>``/``baseline_<m>`` (seed means) and ``best_<m>_seed<s>``,
    ``baseline_<m>_seed<s>``; ``diff_<m>``, ``diff_<m>_ci95_low``/``_high``, ``diff_<m>_p``;
    ``share_within_0.5AP``; ``n_trials_<status>``. Params: ``best.<path>``. Artifacts under
    ``evidence/``: ``summary.json``, ``report.md``, ``ap_vs_iou.png``, ``sensitivity.png``,
    ``paired_differences.png``.
    """
    import tempfile

    from workers.tracking import log_metrics, log_params

    metrics: dict[str, float] = {}
    arms = (("best", summary.best), ("baseline", summary.baseline), ("confirmatory", summary.confirmatory))
    for label, rec in arms:
        if rec is None:
            continue
        for m in (*COMPARED_METRICS, *MECHANISM_METRICS, *(f"{TEST_PREFIX}{m}" for m in COMPARED_METRICS)):
            mean = rec.seed_mean(m)
            if math.isfinite(mean):
                metrics[f"{label}_{m}"] = mean
            for seed, vals in rec.per_seed.items():
                if m in vals:
                    metrics[f"{label}_{m}_seed{seed}"] = vals[m]
    for label, table in (
        ("diff", summary.comparison),
        ("confirmatory_diff", summary.confirmatory_comparison),
    ):
        for m, comp in table.items():
            metrics[f"{label}_{m}"] = comp["mean_diff"]
            metrics[f"{label}_{m}_ci95_low"] = comp["ci95_low"]
            metrics[f"{label}_{m}_ci95_high"] = comp["ci95_high"]
            metrics[f"{label}_{m}_p"] = comp["p_value"]
            if "p_adjusted" in comp:
                metrics[f"{label}_{m}_p_adjusted"] = comp["p_adjusted"]
    c.set_tag(parent_run_id, "hdet.judged_on", summary.judged_on)
    if summary.sensitivity.get("n_configs"):
        metrics["share_within_0.5AP"] = summary.sensitivity["share_within"]
    for status in ("completed", "stopped", "failed", "incomplete"):
        metrics[f"n_trials_{status}"] = float(sum(t.status == status for t in summary.trials))
    metrics["search_cpu_s"] = sum(t.cpu_s for t in summary.trials if math.isfinite(t.cpu_s))
    if math.isfinite(summary.wall_s):
        metrics["search_wall_s"] = summary.wall_s
    log_metrics(c, parent_run_id, metrics, step=0)
    best = summary.best
    if best is not None:
        existing = c.get_run(parent_run_id).data.params
        params = {f"best.{k}": str(v) for k, v in best.params.items()}
        params["best.trial_id"] = best.trial_id
        # MLflow params are immutable: a resumed search that finds another best logs it as a tag.
        fresh = {k: v for k, v in params.items() if k not in existing}
        if fresh:
            log_params(c, parent_run_id, fresh)
        c.set_tag(parent_run_id, "hdet.best_trial_id", best.trial_id)
        c.set_tag(parent_run_id, "hdet.best_config", json.dumps(best.params, sort_keys=True)[:5000])
    c.set_tag(parent_run_id, "hdet.search_complete", "true" if summary.complete else "false")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
        plots = draw_plots(summary, out)
        from workers.report import render_markdown

        (out / "report.md").write_text(render_markdown(summary, {k: v.name for k, v in plots.items()}))
        (out / "table.txt").write_text(summary.format_table() + "\n")
        c.log_artifacts(parent_run_id, tmp, artifact_path="evidence")


def draw_plots(summary: SearchSummary, out: Path) -> dict[str, Path]:
    """The evidence plots of a summary into ``out``: name -> file."""
    from harmonic.plots import plot_ap_vs_iou
    from harmonic.plots_evidence import plot_mechanism, plot_paired_differences, plot_sensitivity

    plots: dict[str, Path] = {}
    if summary.ap_vs_iou:
        ref = "baseline (standard)" if "baseline (standard)" in summary.ap_vs_iou else None
        plots["ap_vs_iou"] = plot_ap_vs_iou(
            summary.ap_vs_iou, out / "ap_vs_iou.png", reference=ref,
            title="AP at each IoU threshold (mean over seeds)",
        )  # fmt: skip
    if summary.sensitivity.get("params"):
        base = summary.baseline.objective if summary.baseline else None
        plots["sensitivity"] = plot_sensitivity(summary.sensitivity, out / "sensitivity.png", baseline=base)
    split = summary.judged_on
    if summary.confirmatory_comparison:
        plots["confirmatory_differences"] = plot_paired_differences(
            summary.confirmatory_comparison, out / "confirmatory_differences.png",
            title=f"Confirmatory configuration - baseline, per seed ({split})",
        )  # fmt: skip
    if summary.comparison:
        plots["paired_differences"] = plot_paired_differences(
            summary.comparison, out / "paired_differences.png",
            title=f"Best configuration - baseline, per seed ({split})",
        )  # fmt: skip
    if summary.mechanism:
        plots["mechanism"] = plot_mechanism(summary.mechanism, out / "mechanism.png")
    return plots


# --------------------------------------------------------------------------- the search


def _trial_outcomes(results: Any, epochs: int) -> dict[str, tuple[str, str | None, dict[str, Any]]]:
    """trial id -> (status, error, last result) from Tune's results."""
    out: dict[str, tuple[str, str | None, dict[str, Any]]] = {}
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
        out[trial.trial_id] = (status, error, last)
    return out


def _mark_trials(c: MlflowClient, ctx: TrackingContext, spec: Spec, outcomes: Mapping[str, Any]) -> None:
    """Write each trial's outcome on its child runs (and close runs an early stop left open)."""
    from workers.tracking import log_metrics

    assert spec.search is not None
    for trial_id, (status, error, last) in outcomes.items():
        runs = [find_child_run(c, ctx, _run_key(trial_id, seed)) for seed in spec.search.seeds]
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
                c.set_tag(run_id, STATUS_TAG, status)
            if error and not run.data.tags.get(ERROR_TAG):
                c.set_tag(run_id, ERROR_TAG, error[:4000])
            if status == "stopped" and run.info.status == "RUNNING":
                c.set_terminated(run_id, status="KILLED")
            if status == "stopped" and "trial_wall_s" not in run.data.metrics:
                # the trial was ended by the scheduler before it could log its compute
                log_metrics(c, run_id, {f"trial_{k}" if not k.startswith("trial_") else k: last[k]
                                        for k in ("trial_wall_s", "cpu_s", "gpu_s", "first_step_s", "epochs_run")
                                        if k in last}, step=0)  # fmt: skip


def _timeline_callbacks() -> list[Any]:
    """A Tune callback that marks each trial's start in the timeline, when one is kept."""
    if not os.environ.get(timeline.ENV):
        return []
    from ray import tune

    class TrialStartMarks(tune.Callback):  # type: ignore[misc]
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            timeline.mark("trial_start", key=trial.trial_id)

    return [TrialStartMarks()]


def _start_train_coordinator() -> None:
    """Start Ray Train's autoscaling coordinator now rather than in the first trial's start.

    Every Train V2 run asks a cluster-wide coordinator (a detached actor, created by the first run
    that needs it) for its resources; creating it here lets its process start while Tune starts
    the trials. Ray-internal: if its place changes, the first run creates it as before.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:  # pragma: no cover - depends on Ray's internals
        pass


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
        print_table: print :meth:`SearchSummary.format_table` at the end (the job log's last word).

    Returns:
        SearchSummary: also logged to the parent run (see :func:`log_summary`). ``complete`` is
        False when the search was interrupted (nothing is concluded then).

    Raises:
        SearchSpaceError: the search section cannot be run.
    """
    import ray
    from ray import tune

    from workers.controller_hooks import start_event_hub
    from workers.tracking import client

    if spec.search is None:
        raise SearchSpaceError("search: the spec has no search section")
    for k, v in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    t0 = time.time()
    param_space = tune_param_space(spec)
    # An empty space is a comparison without a search: the fixed arms only (baseline, confirmatory).
    searching = bool(spec.search.space)
    c = client(ctx.tracking_uri)
    c.set_tag(ctx.parent_run_id, "hdet.search_complete", "false")
    # Drop the search section for the trials: they need the training recipe and the seeds only.
    spec_data = spec.to_dict()
    _start_train_coordinator()
    hub = start_event_hub()  # the trainers' reports reach their trials through it
    trainable = tune.with_resources(
        tune.with_parameters(
            _search_trial, spec_data=spec_data, ctx=ctx, storage_path=storage_path, resumed=resume, hub=hub
        ),
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
    for arm, wanted in ((BASELINE_ID, spec.search.baseline), (CONFIRMATORY_ID, spec.search.confirmatory)):
        if wanted:
            arm_refs[arm] = task.remote(spec_data, ctx, storage_path, resume, hub, arm)
    outcomes: dict[str, tuple[str, str | None, dict[str, Any]]] = {}
    try:
        if tuner is not None:
            outcomes = _trial_outcomes(tuner.fit(), spec.train.epochs)
        interrupted = searching and (any(s == "incomplete" for s, _, _ in outcomes.values()) or not outcomes)
        for arm, ref in arm_refs.items():
            if interrupted:
                ray.cancel(ref, force=True)
                continue
            try:
                ray.get(ref)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # the arm's child runs say what happened; the search stands
                print(f"{arm}: {_short_reason(e)}", flush=True)
    except BaseException:
        for ref in arm_refs.values():
            ray.cancel(ref, force=True)
        raise
    _mark_trials(c, ctx, spec, outcomes)

    summary = collect_summary(c, ctx.experiment_id, ctx.parent_run_id, experiment=ctx.experiment)
    summary.complete = not interrupted
    summary.wall_s = time.time() - t0
    log_summary(c, ctx.parent_run_id, summary)
    if print_table:
        print("\n" + summary.format_table(), flush=True)
    return summary
