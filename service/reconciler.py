"""The reconciler: a thread of the service's background process (:mod:`service.background`) that
brings the records in line with Ray and MLflow every ``reconcile_interval_s`` (2 s); GETs read only
the database it writes.

Each pass: for every active record (``SUBMITTING`` ones are :mod:`service.submitter`'s) ask Ray
(``get_job_info``) and MLflow (the parent run, its children: progress); for a job Ray runs, what its
placement groups say (Ray's state API, once a pass): whether a training has its resources, and what
the others wait for (``waiting_for``); apply :func:`service.transitions.decide` as a compare-and-set
transition, keep an ended job's last 256 KiB of log, and close the MLflow runs a dead job left
``RUNNING``; stop Ray jobs of this service that have no record or whose record ended (never a job
someone else submitted). Ray unreachable changes no status.

A record is written only when what Ray or MLflow say of it changed, or its check time
(``status_checked_at``) is :data:`CHECKED_EVERY_S` old: a write of every active record every pass
held SQLite's write lock against submissions (30-400 ms at 800 records, measured) and made every
record's kept JSON new.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from typing import Any

from service.admission import describe
from service.db import Store, aware
from service.jobs import JobNotFound, JobState, RayJobs, RayUnavailable
from service.mlflow_view import MlflowView
from service.models import RecordFields, utcnow
from service.states import TERMINAL, Status
from service.transitions import EXIT_REFUSED, Verdict, decide

__all__ = ["Reconciler", "LOG_KEEP_BYTES", "log_tail"]

log = logging.getLogger("hdet.service")

#: how much of an ended job's log the record keeps (Ray's copy goes with its head).
LOG_KEEP_BYTES = 256 * 1024
#: lines of log a FAILED record quotes when the job refused its spec or dataset.
FAILURE_LOG_LINES = 40
#: orphan sweeps (a list of every Ray job) run every this many passes.
ORPHAN_EVERY = 5
#: what a job Ray runs waits for before its driver asks for a training's resources
STARTING = "its driver to start a training"
#: above this many active records a pass asks Ray for its job list once, not for each job.
LIST_ABOVE = 8
#: how old an unchanged record's ``status_checked_at`` may get before a pass writes it again
CHECKED_EVERY_S = 30.0
#: what a check may change in a record besides its status and check time
CHECKED_FIELDS = frozenset(
    {
        "ray_status",
        "ray_message",
        "ray_exit_code",
        "waiting_for",
        "mlflow_experiment_id",
        "mlflow_parent_run_id",
        "progress",
    }
)


def _changed(row: RecordFields, fields: dict[str, Any], now: datetime) -> bool:
    """Whether a check's ``fields`` differ from ``row``, or its check time is due again."""
    if any(getattr(row, name) != value for name, value in fields.items() if name in CHECKED_FIELDS):
        return True
    checked = aware(row.status_checked_at)
    return checked is None or (now - checked).total_seconds() >= CHECKED_EVERY_S


def log_tail(text: str, max_bytes: int = LOG_KEEP_BYTES) -> str:
    """The end of ``text``, at most ``max_bytes`` of UTF-8, from a line start where possible."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= max_bytes:
        return text
    cut = raw[-max_bytes:].decode("utf-8", errors="ignore")
    newline = cut.find("\n")
    return cut[newline + 1 :] if 0 <= newline < 4096 else cut


class Reconciler:
    """Follows the active records; :attr:`ready` is set after the first complete pass."""

    def __init__(
        self,
        store: Store,
        jobs: RayJobs,
        mlflow: MlflowView,
        service_id: str,
        *,
        interval_s: float = 2.0,
    ):
        self.store = store
        self.jobs = jobs
        self.mlflow = mlflow
        self.service_id = service_id
        self.interval_s = interval_s
        self.ready = threading.Event()
        self.ray_error: str | None = None
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop_sent: set[str] = set()
        #: this pass's placement groups by Ray job id ({} when Ray's state API did not answer)
        self._groups: dict[str, list[dict[str, Any]]] | None = None
        self._groups_ok = False
        self._nodes: list[dict[str, float]] | None = None

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hdet-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a pass that failed is retried by the next one
                log.exception("reconciler pass failed")
            self._stop.wait(self.interval_s)

    # ------------------------------------------------------------------ one pass

    def run_once(self) -> None:
        """One pass over every active record (callable directly, e.g. by tests)."""
        with self._lock:
            self._groups = self._nodes = None  # asked again, at most once, in this pass
            try:
                active = self.store.active()
                # Many active records: one list of every job beats a request per record.
                known = {j.submission_id: j for j in self.jobs.list()} if len(active) > LIST_ABOVE else None
                checked: list[tuple[str, str, dict[str, Any]]] = []
                for row in active:
                    if self._stop.is_set():
                        return
                    self._reconcile(row, known, checked)
                self.store.update_many(checked)
                if self.passes % ORPHAN_EVERY == 0:
                    self._stop_orphans(list(known.values()) if known is not None else None)
                self.ray_error = None
            except RayUnavailable as e:
                # Nothing changes while Ray cannot be asked; the next pass tries again.
                self.ray_error = str(e)
                log.warning("reconciler: %s", e)
            self.passes += 1
            self.ready.set()

    def _reconcile(
        self,
        row: RecordFields,
        known: dict[str, JobState] | None,
        checked: list[tuple[str, str, dict[str, Any]]],
    ) -> None:
        """Apply the verdict on ``row``; a record that stays where it is goes into ``checked`` when
        Ray's or MLflow's word on it changed, or its check time is :data:`CHECKED_EVERY_S` old."""
        ray: JobState | None
        if known is not None:
            ray = known.get(row.id)
        else:
            try:
                ray = self.jobs.info(row.id)
            except JobNotFound:
                ray = None
        now = utcnow()
        fields: dict[str, Any] = {"status_checked_at": now}
        if ray is not None:
            fields.update(ray_status=ray.status, ray_message=ray.message, ray_exit_code=ray.exit_code)
        parent, mlflow_ok = self._parent(row, fields, ray)
        status = Status(row.status)
        placed: bool | None = None
        if ray is not None and ray.status == "RUNNING" and status in (Status.PENDING, Status.RUNNING):
            placed, fields["waiting_for"] = self._placement(ray)
        elif row.waiting_for is not None:
            fields["waiting_for"] = None
        verdict = decide(status, ray, parent.info.status if parent is not None else None, placed)
        if (
            status == Status.CANCELLING
            and ray is not None
            and not ray.terminal
            and row.id not in self._stop_sent
        ):
            # Once per process: Ray queues a stop behind a start it waits for, and the cancel
            # request's own stop may have found Ray unreachable (or died with its process).
            self._stop_job(row.id)
            self._stop_sent.add(row.id)
        if not mlflow_ok and (ray is None or ray.status == "FAILED"):
            verdict = Verdict(None)  # the verdict needs MLflow's word: wait for it
        if verdict.to is None:
            if _changed(row, fields, now):
                checked.append((row.id, row.status, fields))
            return
        if verdict.to in TERMINAL:
            self._finish(row, verdict, ray, fields)
        if not self.store.transition(row.id, row.status, verdict.to, verdict.reason, **fields):
            return  # another reconciler (a second service on this database) moved it first
        log.info("%s: %s -> %s (%s)", row.id, row.status, verdict.to, verdict.reason)
        if verdict.to in TERMINAL and parent is not None and verdict.close_runs_as is not None:
            # Only after the record's own transition: closed first, the runs would tell a second
            # reconciler racing on this record their new status as the job's outcome.
            self._close_runs(row, verdict, parent)

    def _placement(self, ray: JobState) -> tuple[bool | None, str | None]:
        """Whether a placement group of the running job was created (a training has its
        resources; None when Ray's state API does not say), and what its pending ones wait for."""
        if ray.job_id is None:  # its driver has not connected to Ray yet: it can have asked for nothing
            return False, STARTING
        if self._groups is None:
            try:
                self._groups, self._groups_ok = self.jobs.placement_groups(), True
            except RayUnavailable as e:
                log.warning("reconciler: %s", e)
                self._groups, self._groups_ok = {}, False
        if not self._groups_ok:
            return None, None
        groups = self._groups.get(ray.job_id, [])
        placed = any(g["state"] == "CREATED" for g in groups)
        pending = [g for g in groups if g["state"] in ("PENDING", "RESCHEDULING")]
        if not pending:
            return placed, None if placed else STARTING
        need: dict[str, float] = {}
        for group in pending:
            for bundle in group["bundles"]:
                for name, amount in bundle.items():
                    need[name] = need.get(name, 0.0) + amount
        if self._nodes is None:
            self._nodes = self.jobs.nodes()
        have: dict[str, float] = {}
        for node in self._nodes:
            for name, amount in node.items():
                have[name] = have.get(name, 0.0) + amount
        trainings = f"{len(pending)} training{'s' if len(pending) > 1 else ''}"
        return placed, f"{describe(need)} for {trainings} (the cluster has {describe(have)} in all)"

    def _parent(self, row: RecordFields, fields: dict[str, Any], ray: JobState | None) -> tuple[Any, bool]:
        """The MLflow parent run or None (its ids and the progress go into ``fields``), and
        whether MLflow answered."""
        if ray is not None and ray.status == "PENDING" and row.mlflow_parent_run_id is None:
            return None, True  # nothing can have started
        spec = json.loads(row.spec)
        try:
            if row.mlflow_parent_run_id:
                parent = self.mlflow.client.get_run(row.mlflow_parent_run_id)
            else:
                parent = self.mlflow.find_parent(row.id, spec["tracking"]["experiment"])
            if parent is None:
                return None, True
            fields["mlflow_experiment_id"] = parent.info.experiment_id
            fields["mlflow_parent_run_id"] = parent.info.run_id
            epochs = int(spec["train"]["epochs"])
            progress = self.mlflow.progress(parent, self.mlflow.children(parent), epochs)
            fields["progress"] = json.dumps(progress)
            return parent, True
        except Exception as e:  # MLflow down: Ray's word alone, progress as it was
            log.warning("reconciler: MLflow for %s: %s", row.id, e)
            return None, False

    def _finish(
        self, row: RecordFields, verdict: Verdict, ray: JobState | None, fields: dict[str, Any]
    ) -> None:
        """Before a terminal transition: keep the log, say why it failed."""
        text = None
        if ray is not None:
            try:
                text = self.jobs.logs(row.id)
            except (JobNotFound, RayUnavailable) as e:
                log.warning("reconciler: no log of %s: %s", row.id, e)
        if text is not None:
            fields["log_tail"] = log_tail(text)
        if verdict.failure is not None:
            failure = dict(verdict.failure)
            if failure.get("exit_code") == EXIT_REFUSED and text:
                failure["log_tail"] = "\n".join(text.rstrip().splitlines()[-FAILURE_LOG_LINES:])
            fields["failure"] = json.dumps(failure)

    def _close_runs(self, row: RecordFields, verdict: Verdict, parent: Any) -> None:
        """After a terminal transition: end the job's MLflow runs still open (a job that ended
        without closing them), and record the progress they show then."""
        assert verdict.close_runs_as is not None and verdict.to is not None
        try:
            closed = self.mlflow.close_running(parent, verdict.close_runs_as, verdict.reason)
            if closed:
                log.info("%s: closed MLflow runs %s as %s", row.id, closed, verdict.close_runs_as)
                progress = self.mlflow.progress(
                    self.mlflow.client.get_run(parent.info.run_id),
                    self.mlflow.children(parent),
                    int(json.loads(row.spec)["train"]["epochs"]),
                )
                self.store.update_fields(row.id, verdict.to, progress=json.dumps(progress))
        except Exception as e:
            log.warning("reconciler: closing the MLflow runs of %s: %s", row.id, e)

    def _stop_job(self, exp_id: str) -> None:
        try:
            self.jobs.stop(exp_id)
        except JobNotFound:
            pass

    def _stop_orphans(self, listed: list[JobState] | None = None) -> None:
        """Stop running jobs this service submitted whose record is gone (another database) or
        ended (a cancel while the job was being submitted, by an API that died before it stopped
        the job); jobs sent by ``ray job submit`` are never touched. ``listed``: Ray's job list
        this pass read already (else it is asked)."""
        from service.experiments import SERVICE_METADATA

        mine = [
            j
            for j in (self.jobs.list() if listed is None else listed)
            if j.metadata.get(SERVICE_METADATA) == self.service_id and not j.terminal
        ]
        statuses = self.store.statuses(j.submission_id for j in mine)
        for job in mine:
            status = statuses.get(job.submission_id)
            if status is None or status in TERMINAL:
                why = "it has no record" if status is None else f"its record is {status}"
                log.warning("stopping Ray job %s: submitted by this service but %s", job.submission_id, why)
                self._stop_job(job.submission_id)

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        return self.ready.wait(max(0.0, deadline - time.monotonic()))
