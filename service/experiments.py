"""Submitting and cancelling experiments: the writes a request makes, in the order that leaves
nothing half-done. Validate (:mod:`service.intake`), insert a hidden ``SUBMITTING`` row, submit the
Ray job under the record's id, mark it ``PENDING``.

The record id is Ray's ``submission_id``, so a retried submission can never start a second job:
Ray's "submission_id already exists" counts as success. With an ``Idempotency-Key`` the id derives
from the key: a repeat with the same body gets the same record, another body 422, a repeat while
the first is still being submitted 409.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shlex
import time
from dataclasses import dataclass

from service.db import IdTaken, Store
from service.intake import body_hash, canonical_json
from service.jobs import JobNotFound, RayJobs, RayUnavailable
from service.mlflow_view import MlflowUnavailable, MlflowView
from service.models import ExperimentRow
from service.problems import Problem
from service.settings import Settings
from service.states import TERMINAL, Status
from workers.spec import Spec
from workers.tracking import Tag

__all__ = ["Experiments", "Submission", "SERVICE_METADATA", "RETRY_AFTER_S", "MAX_ENTRYPOINT_CHARS"]

log = logging.getLogger("hdet.service")

#: Ray job metadata naming the service (the database) that submitted a job.
SERVICE_METADATA = "hdet.service"
#: a submission trusts an MLflow answer this recent (readyz always asks afresh)
PING_MAX_AGE_S = 2.0
RETRY_AFTER_S = 5
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

    def submit(self, spec: Spec, idempotency_key: str | None = None) -> Submission:
        """Store and submit ``spec`` (validated); see the module docstring for the order."""
        spec_json = canonical_json(spec)
        digest = body_hash(spec_json)
        exp_id = self.new_id(idempotency_key)
        if idempotency_key is not None:
            existing = self.store.get(exp_id, hidden=True)
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
        try:
            self.mlflow.ping(max_age_s=PING_MAX_AGE_S)
        except MlflowUnavailable as e:
            raise _unavailable("MLflow is unavailable", str(e)) from None
        row = ExperimentRow(
            id=exp_id,
            name=spec.name,
            kind="search" if spec.search is not None else "run",
            loss=spec.loss.kind,
            arch=spec.detector.arch,
            spec=spec_json,
            body_hash=digest,
            idempotency_key=idempotency_key,
        )
        try:
            self.store.insert_submitting(row)
        except IdTaken:
            existing = self.store.get(exp_id, hidden=True)
            if existing is None:  # inserted and deleted again meanwhile (its submission failed)
                raise _unavailable(
                    "Ray is unavailable", "a concurrent submission with this key failed"
                ) from None
            return self._repeat(existing, digest)
        t0 = time.perf_counter()
        try:
            had_it = self.jobs.submit(
                exp_id,
                entrypoint,
                metadata={
                    Tag.EXPERIMENT_ID: exp_id,
                    SERVICE_METADATA: self.service_id,
                    Tag.SPEC_NAME: spec.name,
                },
                runtime_env={"env_vars": self._job_env()},
                **self.settings.entrypoint_options(),
            )
        except RayUnavailable as e:
            self.store.delete_submitting(exp_id)
            raise _unavailable("Ray is unavailable", str(e)) from None
        reason = "submitted to Ray" if not had_it else "submitted to Ray (it had the job already)"
        self.store.transition(
            exp_id, Status.SUBMITTING, Status.PENDING, reason, submit_s=time.perf_counter() - t0
        )
        made = self.store.get(exp_id)
        assert made is not None
        return Submission(made, replayed=False)

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
        if existing.status == Status.SUBMITTING:
            raise Problem(
                409,
                "Submission in progress",
                "a request with this Idempotency-Key is being submitted; repeat it shortly",
                kind="submission-in-progress",
                headers={"Retry-After": "1"},
            )
        return Submission(existing, replayed=True)

    def cancel(self, exp_id: str) -> ExperimentRow:
        """``PENDING | RUNNING -> CANCELLING`` and ask Ray to stop the job (the reconciler asks again
        while it runs); a repeat is a no-op; an ended experiment is 409."""
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


def _unavailable(title: str, detail: str) -> Problem:
    return Problem(503, title, detail, kind="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
