"""Accepting, submitting and cancelling experiments: the writes, in the order that leaves nothing
half-done. A request validates (:mod:`service.intake`) and stores a ``SUBMITTING`` record with its
spec (:meth:`Experiments.accept`, answered 202 at once); the submitter thread sends it to Ray under
the record's id and marks it ``PENDING`` (:meth:`Experiments.send`), or ``FAILED`` when Ray refuses it.

The record id is Ray's ``submission_id``, so a repeated submission (after a crash of the API, or by
a second replica) can never start a second job: Ray's "submission_id already exists" counts as
success when that job is this record's (its metadata says so). With an ``Idempotency-Key`` the id
derives from the key: a repeat with the same body gets the same record, another body 422.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shlex
import time
from dataclasses import dataclass

from service.db import IdTaken, Store
from service.intake import body_hash, canonical_json
from service.jobs import JobNotFound, RayJobs, RayUnavailable, SubmissionRefused
from service.mlflow_view import MlflowView
from service.models import ExperimentRow
from service.problems import Problem
from service.settings import Settings
from service.states import TERMINAL, Status
from workers.spec import Spec
from workers.tracking import Tag

__all__ = [
    "Experiments",
    "Submission",
    "SERVICE_METADATA",
    "ACCEPTED",
    "MAX_ENTRYPOINT_CHARS",
]

log = logging.getLogger("hdet.service")

#: Ray job metadata naming the service (the database) that submitted a job.
SERVICE_METADATA = "hdet.service"
#: the reason of a record's first event
ACCEPTED = "accepted; submitting to Ray"
#: Ray runs the entrypoint through ``sh -c``: one argument, which Linux caps at 128 KiB.
MAX_ENTRYPOINT_CHARS = 120 * 1024
#: how long the job has, after Ray's SIGINT, to end its MLflow runs before Ray kills it.
STOP_WAIT_S = 30


@dataclass(frozen=True)
class Submission:
    row: ExperimentRow
    replayed: bool  # an idempotent repeat: the record of the first request


class Experiments:
    """The service's writes of experiment records and Ray jobs."""

    def __init__(self, store: Store, jobs: RayJobs, mlflow: MlflowView, settings: Settings, service_id: str):
        self.store = store
        self.jobs = jobs
        self.mlflow = mlflow
        self.settings = settings
        self.service_id = service_id

    def new_id(self, idempotency_key: str | None) -> str:
        """``exp-`` + 16 hex: random, or derived from the idempotency key (and this service)."""
        if idempotency_key is None:
            return f"exp-{secrets.token_hex(8)}"
        digest = hashlib.sha256(f"{self.service_id}\0{idempotency_key}".encode()).hexdigest()
        return f"exp-{digest[:16]}"

    def entrypoint(self, exp_id: str, spec_json: str) -> str:
        """``<python> -m workers.run --spec-json '<spec>' --tracking-uri <mlflow> --tag hdet.experiment_id=<id>``."""
        python = self.settings.entrypoint_python or "python"
        argv = [python, "-m", "workers.run", "--spec-json", spec_json]
        argv += ["--tracking-uri", self.mlflow.tracking_uri, "--tag", f"{Tag.EXPERIMENT_ID}={exp_id}"]
        if self.settings.storage_path:
            argv += ["--storage-path", self.settings.storage_path]
        return shlex.join(argv)

    def accept(
        self, spec: Spec, idempotency_key: str | None = None, waiting_for: str | None = None
    ) -> Submission:
        """Store ``spec`` (validated) as a ``SUBMITTING`` record; ``waiting_for`` says what its
        submission waits for when that is known already (Ray unreachable)."""
        spec_json = canonical_json(spec)
        digest = body_hash(spec_json)
        exp_id = self.new_id(idempotency_key)
        if idempotency_key is not None:
            existing = self.store.get(exp_id)
            if existing is not None:
                return self._repeat(existing, digest)
        entrypoint = self.entrypoint(exp_id, spec_json)
        if len(entrypoint) > MAX_ENTRYPOINT_CHARS:
            raise Problem(
                422,
                "Invalid spec",
                "the resolved spec is too large to submit",
                kind="invalid-spec",
                errors=[{"field": "", "message": f"resolved, the spec is {len(spec_json)} characters"}],
            )
        row = ExperimentRow(
            id=exp_id,
            name=spec.name,
            kind="search" if spec.search is not None else "run",
            loss=spec.loss.kind,
            arch=spec.detector.arch,
            spec=spec_json,
            body_hash=digest,
            idempotency_key=idempotency_key,
            waiting_for=waiting_for,
        )
        try:
            self.store.insert_accepted(row, ACCEPTED)
        except IdTaken:
            existing = self.store.get(exp_id)
            assert existing is not None  # a record is never deleted
            return self._repeat(existing, digest)
        return Submission(row, replayed=False)

    def send(self, row: ExperimentRow) -> Status:
        """Submit the Ray job of a ``SUBMITTING`` record; the status it moved to: ``PENDING``,
        ``FAILED`` (Ray refused it), or the one a cancel or another replica gave it meanwhile.
        :class:`RayUnavailable` when Ray cannot be asked: the record stays as it is."""
        t0 = time.perf_counter()
        try:
            had_it = self.jobs.submit(
                row.id,
                self.entrypoint(row.id, row.spec),
                metadata={
                    Tag.EXPERIMENT_ID: row.id,
                    SERVICE_METADATA: self.service_id,
                    Tag.SPEC_NAME: row.name,
                },
                runtime_env={"env_vars": self._job_env()},
                **self.settings.entrypoint_options(),
            )
            if had_it:
                self._check_owned(row.id)
        except SubmissionRefused as e:
            reason = f"Ray refused the submission: {e}"
            failure = json.dumps({"reason": reason, "exit_code": None, "ray_message": str(e)})
            if self.store.transition(
                row.id, Status.SUBMITTING, Status.FAILED, reason, failure=failure, waiting_for=None
            ):
                log.warning("%s: %s", row.id, reason)
                return Status.FAILED
            return self._moved(row.id)
        reason = "submitted to Ray" if not had_it else "submitted to Ray (it had the job already)"
        took = time.perf_counter() - t0
        if self.store.transition(
            row.id, Status.SUBMITTING, Status.PENDING, reason, submit_s=took, waiting_for=None
        ):
            return Status.PENDING
        return self._moved(row.id)

    def _check_owned(self, exp_id: str) -> None:
        """Ray had a job under ``exp_id`` already: it must be this record's, not someone else's."""
        try:
            theirs = self.jobs.info(exp_id).metadata
        except JobNotFound:
            raise RayUnavailable(f"Ray said job {exp_id} exists, then that it does not") from None
        if theirs.get(Tag.EXPERIMENT_ID) != exp_id or theirs.get(SERVICE_METADATA) != self.service_id:
            owner = theirs.get(SERVICE_METADATA) or "not this service"
            raise SubmissionRefused(f"it has another job under submission id {exp_id} (submitted by {owner})")

    def _moved(self, exp_id: str) -> Status:
        """After a lost compare-and-set: what the record became; a job sent for a record cancelled
        meanwhile is stopped."""
        now = self.store.get(exp_id)
        assert now is not None
        if now.status == Status.CANCELLED:
            try:
                self.jobs.stop(exp_id)
                log.info("%s: cancelled while being submitted; its Ray job is stopped", exp_id)
            except JobNotFound:
                pass
            except RayUnavailable as e:
                log.warning("%s: cancelled while being submitted; stopping its job: %s", exp_id, e)
        return Status(now.status)

    def _job_env(self) -> dict[str, str]:
        env = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}
        env.update(self.settings.job_env or {})
        return env

    def _repeat(self, existing: ExperimentRow, digest: str) -> Submission:
        if existing.body_hash != digest:
            raise Problem(
                422,
                "Idempotency key reused",
                f"this Idempotency-Key was used for another spec (experiment {existing.id})",
                kind="idempotency-key-reused",
                errors=[{"field": "Idempotency-Key", "message": "already used with a different body"}],
            )
        return Submission(existing, replayed=True)

    def cancel(self, exp_id: str) -> ExperimentRow:
        """``SUBMITTING -> CANCELLED`` (nothing to stop: a job the submitter sends meanwhile it
        stops); ``PENDING | RUNNING -> CANCELLING`` and ask Ray to stop the job (the reconciler asks
        again while it runs); a repeat is a no-op; an ended experiment is 409."""
        for _ in range(10):
            row = self.store.get(exp_id)
            if row is None:
                raise Problem(404, "Not Found", f"no experiment {exp_id}", kind="not-found")
            if row.status in TERMINAL:
                raise Problem(
                    409,
                    "Experiment ended",
                    f"{exp_id} is {row.status}; there is nothing to cancel",
                    kind="ended",
                )
            if row.status == Status.CANCELLING:
                return row
            if row.status == Status.SUBMITTING:
                reason = "cancelled before it was submitted to Ray"
                if self.store.transition(exp_id, row.status, Status.CANCELLED, reason, waiting_for=None):
                    done = self.store.get(exp_id)
                    assert done is not None
                    return done
                continue
            if self.store.transition(exp_id, row.status, Status.CANCELLING, "cancel requested"):
                break
        try:
            self.jobs.stop(exp_id)
        except JobNotFound:
            pass  # the reconciler decides what became of it
        except RayUnavailable as e:
            log.warning("cancel %s: %s; the reconciler will ask Ray again", exp_id, e)
        row = self.store.get(exp_id)
        assert row is not None
        return row
