"""The life of an experiment record: its statuses, which transitions exist, which are final.
Every other module imports these names; none spells a status string.

``SUBMITTING`` is hidden (a row being submitted to Ray; never listed, never returned). Then
``PENDING -> RUNNING -> SUCCEEDED | FAILED``; ``PENDING | RUNNING -> CANCELLING -> CANCELLED``;
any non-terminal status ``-> LOST`` (Ray no longer knows the job and MLflow has no outcome). A job
that ends while being cancelled keeps Ray's verdict (``CANCELLING -> SUCCEEDED | FAILED``).
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
#: statuses the reconciler follows.
ACTIVE = frozenset({Status.PENDING, Status.RUNNING, Status.CANCELLING})
#: what the API shows (everything but the hidden SUBMITTING).
VISIBLE = ACTIVE | TERMINAL

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.SUBMITTING: frozenset({Status.PENDING}),
    Status.PENDING: frozenset({Status.RUNNING, Status.CANCELLING} | TERMINAL),
    Status.RUNNING: frozenset({Status.CANCELLING} | TERMINAL),
    Status.CANCELLING: TERMINAL,
}


def can_move(current: str, to: str) -> bool:
    """Whether ``current -> to`` is a transition of the record's state machine."""
    return Status(to) in TRANSITIONS.get(Status(current), frozenset())
