"""One configuration trained on every seed at once: SeedGroup, and train_on_seeds that runs one.
The seeds' trainers report each epoch through the search's event hub; the group reports seed means.

Seeds are a blocking factor, not a hyperparameter: one Tune trial trains its configuration on
every seed of ``search.seeds``, one trainer per seed (Ray Train's, or a pooled task:
:mod:`workers.training.pooled`), all started at once. Each trainer's
per-epoch report reaches the trial through a :class:`~workers.training.controller_hooks.SeedReportCallback`
and the search's event hub; once every seed has finished epoch ``k`` the trial reports the seed
mean of epoch ``k``. So ASHA and TPE rank configurations by the seed-averaged AP, and ASHA stops
all seeds of a configuration together (a sequential trial would report its first mean only near
its end, leaving ASHA nothing to stop). A seed whose training fails fails the configuration.

A seed's training is an MLflow child run keyed by :func:`run_key`, so a retried or resumed trial
finds it again; a seed that FINISHED before an interruption is replayed from MLflow, and one that
resumed from a checkpoint gets the epochs before it from its child run once it ends.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from workers import marks
from workers.env import TRAIN_ENV_DEFAULTS
from workers.evidence import aggregate_seeds
from workers.spec import Spec, SpecError
from workers.summary import OBJECTIVE, REPORTED_METRICS
from workers.summary.store import epoch_history
from workers.tracking import Tag, find_child_run

if TYPE_CHECKING:
    from workers.tracking import TrackingContext

__all__ = ["TrialFailure", "SeedEvent", "SeedGroup", "train_on_seeds", "run_key", "compute_metrics"]


class TrialFailure(RuntimeError):
    """A configuration failed on at least one seed; the message is the reason."""


class SeedEvent(NamedTuple):
    """One event of a seed's trainer, as the event hub carries it (a plain tuple on the wire)."""

    kind: str  # "report" (payload: the epoch's metrics), "done", or "failed" (payload: the reason)
    key: str  # the seed's run key
    payload: Any
    at: float  # when it happened (time.time())


def run_key(trial_id: str, seed: int) -> str:
    """The MLflow child run key (and Ray Train run name suffix) of one seed of one configuration."""
    return f"{trial_id}-seed{seed}"


#: the compute a trial reports: its wall time, its trainers' CPU/GPU-seconds, its first step, epochs run.
COMPUTE_KEYS = ("trial_wall_s", "cpu_s", "gpu_s", "first_step_s", "epochs_run")


def compute_metrics(values: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's compute as its child runs log it: every :data:`COMPUTE_KEYS` name with ``trial_``."""
    return {k if k.startswith("trial_") else f"trial_{k}": values[k] for k in COMPUTE_KEYS if k in values}


def short_reason(e: BaseException) -> str:
    """``Type: message`` of an exception, cut to 2000 characters."""
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text}"[:2000]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


#: This process's event hub, for train_on_seeds() called outside a search, and the Ray it is on.
_HUB: Any = None
_HUB_RAY: tuple[str, str] | None = None


def _event_hub() -> Any:
    """The hub of this process on the Ray it is connected to now (a handle from an earlier Ray,
    shut down since, would bring this process down when it is passed to a task)."""
    global _HUB, _HUB_RAY
    import ray

    from workers.training.controller_hooks import start_event_hub

    ctx = ray.get_runtime_context()
    here = (str(ctx.gcs_address), str(ctx.get_node_id()))
    if _HUB is None or _HUB_RAY != here:
        _HUB, _HUB_RAY = start_event_hub(), here
    return _HUB


class SeedGroup:
    """The trainers of one configuration, one per seed, and the seed means they report.

    :meth:`run` is the whole life of a group: :meth:`start` replays finished seeds and starts a
    fit thread per other seed; :meth:`pump` takes the trainers' events until every seed has ended
    or one failed, reporting each epoch every seed has finished (:meth:`report_complete_epochs`);
    :meth:`stop` aborts the trainers still running (an early stop, a failure);
    :meth:`record_compute` logs the compute used (and the failure) on every seed's child run.

    Args:
        spec: the experiment spec (with its ``search`` section).
        overrides: dotted spec paths -> values of this configuration (e.g. ``{"loss.alpha": 1.2}``).
        trial_id: the Tune trial id (``baseline`` or ``confirmatory`` for a fixed arm); with the
            seed it keys the MLflow child runs and names the Ray Train runs.
        arm: ``search``, ``baseline`` or ``confirmatory`` (an MLflow tag).
        ctx: the experiment's tracking context.
        storage_path: Ray Train storage.
        report: called once per epoch with the seed means (``tune.report`` in a trial).
        t_start: when the trial started (default: now); ``first_step_s`` counts from it.
        replay: look for seeds that finished before an interruption (a resumed search) and
            replay them from MLflow instead of training them; False skips that query.
        hub: the search's :class:`~workers.training.controller_hooks.EventHub` (default: one of this
            process's own).
        slots: the search's :class:`~workers.search.slots.TrainingSlots`: each seed takes a slot
            before its trainer starts and gives it back when it ends (None: every seed starts at once).

    Raises:
        TrialFailure: a seed's spec is invalid (every seed's child run is then marked failed
            with the reason).
    """

    def __init__(
        self,
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
        slots: Any = None,
    ):
        assert spec.search is not None
        self.t_start = time.time() if t_start is None else t_start
        self.hub = _event_hub() if hub is None else hub
        from workers.training.trainer import (
            resolve_use_gpu,
        )  # (after t_start: the import is part of the start)

        for k, v in TRAIN_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        self.spec, self.trial_id, self.arm, self.ctx = spec, trial_id, arm, ctx
        self.storage_path, self.report, self.replay = storage_path, report, replay
        self.slots = slots
        self.holding: set[str] = set()  # run keys holding a slot (renewed while they train)
        self.seeds = list(spec.search.seeds)
        self.keys = {run_key(trial_id, seed): seed for seed in self.seeds}
        self.config_json = json.dumps(dict(overrides), sort_keys=True, default=str)
        self.base = spec.model_copy(update={"search": None, "evidence": None})  # one training per seed
        self.seed_specs = self._seed_specs(overrides)
        sc = spec.scaling
        use_gpu = resolve_use_gpu(spec)
        self.trainer_cpus = sc.num_workers * sc.cpus_per_worker
        self.trainer_gpus = sc.num_workers * sc.gpus_per_worker if use_gpu else 0.0

        self.history: dict[int, dict[int, dict[str, float]]] = {seed: {} for seed in self.seeds}
        self.started: dict[int, float] = {}
        self.ended: dict[int, float] = {}
        self.first_step: dict[int, float] = {}
        self.run_ids: dict[int, str] = {}
        self.trainers: dict[int, Any] = {}
        self.threads: list[threading.Thread] = []
        self.pending: set[int] = set()  # seeds whose trainer has not ended
        self.next_epoch = 1  # the next epoch to report
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # ----------------------------------------------------------------------- naming

    def tags(self, seed: int) -> dict[str, str]:
        """The tags of a seed's child run."""
        return {
            Tag.TRIAL_ID: self.trial_id,
            Tag.SEED: str(seed),
            Tag.ARM: self.arm,
            Tag.CONFIG: self.config_json[:5000],
        }

    def run_name(self, seed: int) -> str:
        """The Ray Train run's name (the same after an interruption: Ray Train then resumes it from
        its checkpoint) and the MLflow child run's."""
        return f"{self.spec.name}-{self.ctx.parent_run_id[:8]}-{run_key(self.trial_id, seed)}"

    def _seed_specs(self, overrides: Mapping[str, Any]) -> dict[int, Spec]:
        """Each seed's spec; an invalid configuration fails every seed's child run at once."""
        from workers.tracking import CHILD_ROLE, client, find_or_create_child_run, mark_run, run_tags

        seed_specs: dict[int, Spec] = {}
        for seed in self.seeds:
            try:
                seed_specs[seed] = self.base.with_overrides(
                    {**overrides, "train.seed": seed}, check_paths=False
                )
            except SpecError as e:
                problems = "; ".join(f"{p}: {m}" for p, m in e.problems)
                reason = f"invalid configuration {self.config_json}: {problems}"
                mc = client(self.ctx.tracking_uri)
                for s in self.seeds:
                    tags = {**run_tags(self.base, CHILD_ROLE), **self.tags(s)}
                    run_id = find_or_create_child_run(
                        self.ctx, run_key(self.trial_id, s), self.run_name(s), tags
                    )
                    mc.set_tag(run_id, Tag.TRIAL_STATUS, "failed")
                    mark_run(mc, run_id, "FAILED", reason)
                raise TrialFailure(reason) from None
        return seed_specs

    def run_id_of(self, seed: int) -> str:
        """The seed's child run: its trainer's rank-0 worker creates it (``defer_run``)."""
        from workers.training.run_tracking import prepare_child_run

        if seed in self.run_ids:
            return self.run_ids[seed]
        if seed in self.trainers:
            run_id = self.trainers[seed].child_run_id()
        else:
            run_id = prepare_child_run(
                self.ctx, self.seed_specs[seed], run_key=run_key(self.trial_id, seed),
                run_name=self.run_name(seed), tags={**self.tags(seed), Tag.TRIAL_STATUS: "running"},
            )  # fmt: skip
        self.run_ids[seed] = run_id
        return run_id

    # ----------------------------------------------------------------------- life cycle

    def run(self) -> dict[str, Any]:
        """Start, pump to the end, record the compute; see :func:`train_on_seeds`."""
        self.start()
        try:
            self.report_complete_epochs()  # every seed replayed from MLflow
            self.pump()
        except BaseException:
            # Stopped by the scheduler (tune.report raised SystemExit) or torn down: the trainers
            # must not train on in this process, which Tune may reuse for the next trial.
            self.stop()
            self.record_compute(None)
            raise
        if self.failure is None:
            self.failure = self.unreported()
        if self.failure is not None:
            self.stop()  # the configuration failed: its other seeds would only waste compute
            self.record_compute(self.failure)
            raise TrialFailure(self.failure)
        self.record_compute(None)
        self.report_complete_epochs()
        return {"history": self.history, **self.compute(time.time())}

    def start(self) -> None:
        """Replay the seeds that finished before an interruption; start a fit thread for each other."""
        from workers.tracking import client

        rc: Any = client(self.ctx.tracking_uri) if self.replay else None
        for seed in self.seeds:
            key = run_key(self.trial_id, seed)
            existing = find_child_run(rc, self.ctx, key) if self.replay else None
            if existing is not None and existing.info.status == "FINISHED":
                self.run_ids[seed] = existing.info.run_id
                self.history[seed] = epoch_history(rc, existing.info.run_id)
                self.started[seed] = self.ended[seed] = time.time()
                continue
            self.threads.append(
                threading.Thread(target=self._fit, args=(seed, key), name=f"hdet-{key}", daemon=True)
            )
        self.pending = {seed for seed in self.seeds if seed not in self.ended}
        for th in self.threads:
            th.start()
        if self.slots is not None and self.threads:
            threading.Thread(
                target=self._renew_slots, name=f"hdet-slots-{self.trial_id}", daemon=True
            ).start()

    def _granted(self, ask: Callable[[], Any]) -> bool:
        """Ask the slots (``ask``: a call that waits up to 5 s) until they grant: False once the trial stops."""
        import ray

        while not ray.get(ask()):
            if self._stopping.is_set():
                return False
        return True

    def _take_slot(self, seed: int, key: str) -> None:
        """Wait for the search's slot of this seed (lowest seed first); raises when the trial stops."""
        if not self._granted(lambda: self.slots.acquire.remote(key, seed, 5.0)):
            self.slots.release.remote(key)
            raise RuntimeError("the trial was stopped before this seed started")
        with self._lock:
            self.holding.add(key)

    def _begin(self, key: str, trainer: Any) -> None:
        """Wait until this prepared seed may reserve its resources; raises when the trial stops."""
        if not self._granted(lambda: self.slots.begin.remote(key, 5.0)):
            trainer.close_mlflow_run("KILLED")
            raise RuntimeError("the trial was stopped before this seed started")

    def _renew_slots(self) -> None:
        """Renew the slots this group holds while any seed trains (:data:`workers.search.slots.LEASE_S`)."""
        from workers.search.slots import LEASE_S

        while self.pending and not self._stopping.is_set():
            with self._lock:
                keys = sorted(self.holding)
            if keys:
                self.slots.renew.remote(keys)
            self._stopping.wait(LEASE_S / 4)

    def _fit(self, seed: int, key: str) -> None:
        """A seed's fit thread: build its trainer, fit it, and tell the hub how it ended."""
        from workers.training.controller_hooks import SeedReportCallback
        from workers.training.pooled import PooledTrainer, make_training

        try:
            if self.slots is not None:
                self._take_slot(seed, key)
            self.started[seed] = time.time()
            trainer = make_training(
                self.seed_specs[seed], run_name=self.run_name(seed), storage_path=self.storage_path,
                tracking=self.ctx, callbacks=[SeedReportCallback(self.hub, key)], hub=self.hub,
                run_key=key, tags={**self.tags(seed), Tag.TRIAL_STATUS: "running"}, defer_run=True,
            )  # fmt: skip
            with self._lock:
                if self._stopping.is_set():
                    trainer.close_mlflow_run("KILLED")
                    raise RuntimeError("the trial was stopped before this seed started")
                self.trainers[seed] = trainer
            if self.slots is not None:
                self._begin(key, trainer)
            marks.mark("trainer_fit", key)
            if isinstance(trainer, PooledTrainer):
                # the slot goes back once the training's resources are, before its run is closed
                trainer.fit(freed=lambda: self._give_back(key))
            else:
                trainer.fit()
            marks.mark("fit_end", key)
        except BaseException as e:  # reported to the trial, which fails the configuration
            self._give_back(key)
            self.hub.put.remote(tuple(SeedEvent("failed", key, short_reason(e), time.time())))
        else:
            self._give_back(key)
            self.hub.put.remote(tuple(SeedEvent("done", key, None, time.time())))

    def _give_back(self, key: str) -> None:
        with self._lock:
            if self.slots is None or key not in self.holding:
                return
            self.holding.discard(key)
        self.slots.release.remote(key)

    def pump(self) -> None:
        """Take the trainers' events until every seed has ended or one has failed (``failure``)."""
        import ray

        while self.pending and self.failure is None:
            for event in map(SeedEvent._make, ray.get(self.hub.take.remote(list(self.keys), 10.0))):
                seed = self.keys[event.key]
                if seed not in self.pending:
                    continue
                if event.kind == "report":
                    epoch = int(event.payload["epoch"])
                    self.history[seed][epoch] = {
                        k: float(v) for k, v in event.payload.items() if _is_number(v)
                    }
                    if seed not in self.first_step and "epoch_time_s" in event.payload:
                        # the first epoch started epoch_time_s before its report (an upper bound on
                        # the start of the first step: the report reaches us one controller poll later)
                        self.first_step[seed] = event.at - float(event.payload["epoch_time_s"])
                    self.report_complete_epochs()
                else:
                    self.ended[seed] = event.at
                    self.pending.discard(seed)
                    if event.kind == "failed":
                        self.failure = f"seed {seed}: {event.payload}"
                        break
                    self.fill_from_run(seed)
                    self.report_complete_epochs()

    def missing_epochs(self, seed: int) -> list[int]:
        """The epochs of ``seed`` that this trial has no metrics of."""
        return [e for e in range(1, self.spec.train.epochs + 1) if e not in self.history[seed]]

    def fill_from_run(self, seed: int) -> None:
        """The epochs a seed's training did not report to this trial, from its child run: a training
        resumed from a checkpoint reports only the epochs after it (its worker logged the earlier ones)."""
        missing = self.missing_epochs(seed)
        if not missing:
            return
        from workers.tracking import client

        logged = epoch_history(client(self.ctx.tracking_uri), self.run_id_of(seed))
        self.history[seed].update({e: logged[e] for e in missing if e in logged})

    def unreported(self) -> str | None:
        """Why the trial could not report every epoch (None: it could): a seed whose epochs are
        neither reported nor in its child run."""
        lacking = {sd: eps for sd in sorted(self.history) if (eps := self.missing_epochs(sd))}
        if not lacking:
            return None
        return "; ".join(
            f"seed {sd}: its training ended without epochs {eps} (neither reported nor in its child run)"
            for sd, eps in lacking.items()
        )

    def report_complete_epochs(self) -> None:
        """Report the seed means of every epoch all seeds have finished, in order (``report``)."""
        while all(self.next_epoch in self.history[sd] for sd in self.seeds):
            if self.next_epoch >= self.spec.train.epochs and self.pending:
                # The last epoch is reported only once every trainer has returned: the scheduler
                # ends the trial at max_t, which would cut the trainers' final logging short.
                return
            per_seed = {sd: self.history[sd][self.next_epoch] for sd in self.seeds}
            agg = aggregate_seeds(
                {sd: {k: m[k] for k in REPORTED_METRICS if k in m} for sd, m in per_seed.items()}
            )
            row: dict[str, Any] = {k: v["mean"] for k, v in agg.items()}
            row[f"{OBJECTIVE}_std"] = agg.get(OBJECTIVE, {}).get("std", float("nan"))
            for sd, m in per_seed.items():
                row[f"{OBJECTIVE}_seed{sd}"] = m.get(OBJECTIVE, float("nan"))
            row.update(self.compute(time.time()))
            row["epoch"] = self.next_epoch  # (no "done" key: Tune would end the trial on it)
            if self.report is not None:
                self.report(row)  # raises SystemExit when the scheduler stops the trial
            self.next_epoch += 1

    def compute(self, now: float) -> dict[str, float]:
        """The compute used so far (:data:`COMPUTE_KEYS`)."""
        # From each training's first step: a training that waits for CPUs (trainings beyond the
        # cluster's wait their turn) holds none meanwhile.
        busy = sum(self.ended.get(sd, now) - at for sd, at in self.first_step.items())
        fs = [self.first_step[sd] - self.t_start for sd in self.first_step]
        return {
            "trial_wall_s": now - self.t_start,
            "cpu_s": busy * self.trainer_cpus,
            "gpu_s": busy * self.trainer_gpus,
            "first_step_s": min(fs) if fs else float("nan"),
            "epochs_run": float(sum(len(h) for h in self.history.values())),
        }

    def stop(self) -> None:
        """Abort the trainers still running and give their child runs the epochs they reported."""
        from workers.tracking import client, log_missing_epochs

        with self._lock:
            self._stopping.set()
            running = [self.trainers[sd] for sd in self.pending if sd in self.trainers]
        refs = [r for r in (t.abort_async() for t in running) if r is not None]
        deadline = time.time() + 30.0
        if refs:
            import ray

            ray.wait(refs, num_returns=len(refs), timeout=30.0)
        # Each seed's fit thread closes its child run (KILLED) once its controller is gone: wait for
        # that, so that no run is left RUNNING when the trial returns (Tune may reuse the process).
        for th in self.threads:
            th.join(timeout=max(0.0, deadline - time.time()))
        c = client(self.ctx.tracking_uri)
        for sd in self.pending:
            # A worker logs an epoch to MLflow just after reporting it; the abort may have come
            # in between. The trial has the report: log what the child run lacks.
            log_missing_epochs(c, self.run_id_of(sd), self.history[sd])

    def record_compute(self, failure: str | None) -> None:
        """Log the compute used on every seed's child run; with ``failure``, mark them failed."""
        from workers.tracking import client, log_metrics

        metrics = compute_metrics(self.compute(time.time()))
        c = client(self.ctx.tracking_uri)
        for seed in self.seeds:
            run_id = self.run_id_of(seed)
            trainer_wall_s = self.ended.get(seed, time.time()) - self.started.get(seed, self.t_start)
            log_metrics(c, run_id, {**metrics, "trainer_wall_s": trainer_wall_s}, step=0)
            if failure is not None:
                c.set_tag(run_id, Tag.TRIAL_STATUS, "failed")
                c.set_tag(run_id, Tag.ERROR, failure[:4000])
                if c.get_run(run_id).info.status == "RUNNING":
                    c.set_terminated(run_id, status="FAILED" if f"seed {seed}:" in failure else "KILLED")


def train_on_seeds(
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
    slots: Any = None,
) -> dict[str, Any]:
    """Train one configuration on every seed of ``spec.search.seeds`` at once (:class:`SeedGroup`'s
    arguments; with ``slots``, as the cluster's room admits them); report seed means.

    Returns:
        dict: ``history`` (per-seed history ``{seed: {epoch: metrics}}``) and the compute used
        (``trial_wall_s``, ``cpu_s``, ``gpu_s``, ``first_step_s``, ``epochs_run``).

    Raises:
        TrialFailure: a seed's spec is invalid or its training failed; the message says which
            and why. The seeds' child runs are marked failed with the reason.
    """
    group = SeedGroup(
        spec, overrides, trial_id=trial_id, arm=arm, ctx=ctx, storage_path=storage_path, report=report,
        t_start=t_start, replay=replay, hub=hub, slots=slots,
    )  # fmt: skip
    return group.run()
