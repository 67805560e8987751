"""The next status of a record from what Ray and MLflow say: one pure function, no I/O.

Ray's verdict comes first, checked against the MLflow parent run (tag ``hdet.experiment_id``):

* Ray ``RUNNING``: a ``PENDING`` record is ``RUNNING`` once a training of the job has its resources
  (Ray runs a job as soon as its driver starts, while its trainings may wait for resources; without
  word on placement groups, at once); Ray ``STOPPED``: ``CANCELLED``.
* Ray ``SUCCEEDED``: ``SUCCEEDED``.
* Ray ``FAILED``: ``SUCCEEDED`` if the parent run ended ``FINISHED`` (the supervisor died after the
  work was done); ``CANCELLED`` if a cancel was asked (Ray cannot stop a job that waits for
  resources: the stop waits for its start, or Ray fails it when the start times out); else
  ``FAILED`` saying why: exit 2 "spec or dataset refused" (the job checks dataset paths, the
  service cannot), exit 1 "training failed", else Ray's message.
* Ray does not know the job (its head restarted): the parent run's outcome (``FINISHED`` ->
  ``SUCCEEDED``, ``FAILED`` -> ``FAILED``, ``KILLED`` -> ``CANCELLED`` when a cancel was asked, else
  ``FAILED``); no outcome -> ``LOST``.

A terminal verdict says how to end the MLflow runs the job left ``RUNNING`` (it is gone, nobody else
will): ``KILLED`` for a cancel, ``FAILED`` with the reason otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.jobs import JobState
from service.states import Status

__all__ = ["Verdict", "decide", "EXIT_REFUSED", "EXIT_FAILED"]

#: exit codes of ``python -m workers.run``.
EXIT_FAILED = 1
EXIT_REFUSED = 2


@dataclass(frozen=True)
class Verdict:
    """A transition to make (``to``), why, the failure to record and how to close MLflow runs."""

    to: Status | None
    reason: str = ""
    failure: dict[str, Any] | None = None
    close_runs_as: str | None = None


_STAY = Verdict(None)


def decide(
    status: Status, ray: JobState | None, parent_status: str | None, placed: bool | None = None
) -> Verdict:
    """The verdict for a record in ``status`` (an active one).

    Args:
        status: the record's status (PENDING, RUNNING or CANCELLING).
        ray: what Ray says, or None when Ray does not know the job.
        parent_status: the MLflow parent run's status (RUNNING, FINISHED, FAILED, KILLED), or None.
        placed: whether a placement group of the job was created (a training has its resources);
            None when Ray's state API did not say.
    """
    if ray is None:
        return _without_ray(status, parent_status)
    if ray.status in ("PENDING", "RUNNING"):
        if ray.status == "RUNNING" and status == Status.PENDING and placed is not False:
            return Verdict(
                Status.RUNNING, "Ray started the job" if placed is None else "a training has its resources"
            )
        return _STAY
    if ray.status == "STOPPED":
        return Verdict(Status.CANCELLED, "Ray stopped the job", close_runs_as="KILLED")
    if ray.status == "SUCCEEDED":
        return Verdict(Status.SUCCEEDED, "the job exited 0")
    # FAILED
    if parent_status == "FINISHED":
        return Verdict(
            Status.SUCCEEDED,
            f"Ray reported FAILED ({ray.message or 'no message'}) but the MLflow parent run FINISHED",
        )
    if status == Status.CANCELLING:
        # e.g. a job cancelled before it could start: Ray fails it when its start times out
        reason = f"cancelled; Ray reported FAILED ({ray.message or 'no message'})"
        return Verdict(Status.CANCELLED, reason, close_runs_as="KILLED")
    if ray.exit_code == EXIT_REFUSED:
        reason = "spec or dataset refused"
    elif ray.exit_code == EXIT_FAILED:
        reason = "training failed"
    else:
        reason = ray.message or "Ray reported the job FAILED"
    failure = {"reason": reason, "exit_code": ray.exit_code, "ray_message": ray.message}
    return Verdict(Status.FAILED, f"{reason} (exit {ray.exit_code})", failure, close_runs_as="FAILED")


def _without_ray(status: Status, parent_status: str | None) -> Verdict:
    gone = "Ray no longer knows the job (its head restarted?)"
    if parent_status == "FINISHED":
        return Verdict(Status.SUCCEEDED, f"{gone}; its MLflow parent run FINISHED")
    if parent_status == "KILLED" and status == Status.CANCELLING:
        return Verdict(Status.CANCELLED, f"{gone}; its MLflow parent run was KILLED", close_runs_as="KILLED")
    if parent_status in ("FAILED", "KILLED"):
        reason = f"{gone}; its MLflow parent run ended {parent_status}"
        return Verdict(Status.FAILED, reason, {"reason": reason, "exit_code": None}, close_runs_as="FAILED")
    reason = f"{gone} and MLflow has no outcome" + (
        " (its parent run is still RUNNING)" if parent_status else ""
    )
    return Verdict(Status.LOST, reason, {"reason": reason, "exit_code": None}, close_runs_as="FAILED")
