"""What a record becomes from what Ray and MLflow say (service.transitions.decide: no I/O), and the
state machine's transitions."""

from __future__ import annotations

import pytest

from service.jobs import JobState
from service.reconciler import log_tail
from service.states import TERMINAL, Status, can_move
from service.transitions import decide


def ray(status: str, exit_code: int | None = None, message: str | None = None) -> JobState:
    return JobState("exp-0123456789abcdef", status, message, exit_code)


@pytest.mark.parametrize(
    ("status", "job", "parent", "to"),
    [
        (Status.PENDING, ray("PENDING"), None, None),
        (Status.PENDING, ray("RUNNING"), None, Status.RUNNING),
        (Status.RUNNING, ray("RUNNING"), "RUNNING", None),
        (Status.CANCELLING, ray("RUNNING"), "RUNNING", None),
        (Status.RUNNING, ray("SUCCEEDED", 0), "FINISHED", Status.SUCCEEDED),
        (Status.PENDING, ray("SUCCEEDED", 0), None, Status.SUCCEEDED),
        (Status.RUNNING, ray("STOPPED"), "KILLED", Status.CANCELLED),
        (Status.PENDING, ray("STOPPED"), None, Status.CANCELLED),
        (Status.CANCELLING, ray("STOPPED"), "RUNNING", Status.CANCELLED),
        (Status.CANCELLING, ray("SUCCEEDED", 0), "FINISHED", Status.SUCCEEDED),
        (Status.CANCELLING, ray("FAILED", None, "start timed out"), None, Status.CANCELLED),
        (Status.RUNNING, ray("FAILED", 2), None, Status.FAILED),
        (Status.RUNNING, ray("FAILED", 1), "FAILED", Status.FAILED),
        (Status.RUNNING, ray("FAILED", None, "Job supervisor actor died"), "FINISHED", Status.SUCCEEDED),
        (Status.RUNNING, None, "FINISHED", Status.SUCCEEDED),
        (Status.RUNNING, None, "FAILED", Status.FAILED),
        (Status.CANCELLING, None, "KILLED", Status.CANCELLED),
        (Status.RUNNING, None, "RUNNING", Status.LOST),
        (Status.PENDING, None, None, Status.LOST),
    ],
)
def test_the_verdict_of_ray_checked_against_mlflow(
    status: Status, job: JobState | None, parent: str | None, to: Status | None
) -> None:
    verdict = decide(status, job, parent)
    assert verdict.to == to
    if to is not None:
        assert verdict.reason
        assert can_move(status, to)


@pytest.mark.parametrize(
    ("exit_code", "message", "reason"),
    [
        (2, None, "spec or dataset refused"),
        (1, None, "training failed"),
        (137, "killed by the OOM killer", "OOM"),
    ],
)
def test_a_failure_says_why(exit_code: int, message: str | None, reason: str) -> None:
    verdict = decide(Status.RUNNING, ray("FAILED", exit_code, message), "RUNNING")
    assert verdict.to == Status.FAILED
    assert verdict.failure is not None and reason in verdict.failure["reason"]
    assert verdict.failure["exit_code"] == exit_code
    assert verdict.close_runs_as == "FAILED"


def test_runs_of_a_cancelled_job_are_closed_killed_and_of_a_lost_one_failed() -> None:
    assert decide(Status.RUNNING, ray("STOPPED"), "RUNNING").close_runs_as == "KILLED"
    lost = decide(Status.RUNNING, None, "RUNNING")
    assert lost.close_runs_as == "FAILED" and lost.failure is not None
    assert decide(Status.RUNNING, ray("SUCCEEDED", 0), "FINISHED").close_runs_as is None


@pytest.mark.parametrize(("placed", "to"), [(False, None), (True, Status.RUNNING), (None, Status.RUNNING)])
def test_a_running_driver_is_pending_until_a_training_has_its_resources(
    placed: bool | None, to: Status | None
) -> None:
    assert decide(Status.PENDING, ray("RUNNING"), None, placed).to == to
    assert decide(Status.PENDING, ray("SUCCEEDED", 0), None, placed).to == Status.SUCCEEDED  # ended meanwhile


def test_terminal_statuses_never_move_and_submitting_becomes_pending_failed_or_cancelled() -> None:
    for end in TERMINAL:
        assert not any(can_move(end, to) for to in Status)
    assert [to for to in Status if can_move(Status.SUBMITTING, to)] == [
        Status.PENDING,
        Status.FAILED,
        Status.CANCELLED,
    ]
    assert not can_move(Status.RUNNING, Status.PENDING)


def test_a_kept_log_is_its_last_256_kib_from_a_line_start() -> None:
    text = "".join(f"line {i:06d}\n" for i in range(40000))  # 480 KB
    kept = log_tail(text)
    assert len(kept.encode()) <= 256 * 1024
    assert kept.startswith("line ") and text.endswith(kept)
    assert log_tail("short\n") == "short\n"
