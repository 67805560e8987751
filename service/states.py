"""The life of an experiment record: its statuses, which transitions exist, which are final.
Every other module imports these names; none spells a status string.

``SUBMITTING``: accepted and stored, its Ray job being submitted (the submitter of
:mod:`service.submitter` sends it, again after a restart of the API or while Ray is unreachable).
Then ``SUBMITTING -> PENDING -> RUNNING -> SUCCEEDED | FAILED``; ``SUBMITTING -> FAILED`` when Ray
refuses the submission; ``SUBMITTING -> CANCELLED`` when a cancel comes first (no job to stop);
``PENDING | RUNNING -> CANCELLING -> CANCELLED``; a followed status ``-> LOST`` (Ray no longer knows
the job and MLflow has no outcome). A job that ends while being cancelled keeps Ray's verdict
(``CANCELLING -> SUCCEEDED | FAILED``).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Status", "TERMINAL", "ACTIVE", "VISIBLE", "TRANSITIONS", "can_move"]


class Status(StrEnum):
    SUBMITTING = "SUBMITTING"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"


#: statuses that never change again.
TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.LOST})
#: statuses the reconciler follows (a SUBMITTING record is the submitter's).
ACTIVE = frozenset({Status.PENDING, Status.RUNNING, Status.CANCELLING})
#: what the API shows and filters on: every status.
VISIBLE = frozenset(Status)

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.SUBMITTING: frozenset({Status.PENDING, Status.FAILED, Status.CANCELLED}),
    Status.PENDING: frozenset({Status.RUNNING, Status.CANCELLING} | TERMINAL),
    Status.RUNNING: frozenset({Status.CANCELLING} | TERMINAL),
    Status.CANCELLING: TERMINAL,
}


def can_move(current: str, to: str) -> bool:
    """Whether ``current -> to`` is a transition of the record's state machine."""
    return Status(to) in TRANSITIONS.get(Status(current), frozenset())
