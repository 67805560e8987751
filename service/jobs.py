"""Ray, as the service sees it: the Jobs HTTP API through ``JobSubmissionClient``, with timeouts.
Never ``ray.init``, never torch: a job lives as long as the cluster, not as long as this process.

Ray's client raises ``RuntimeError`` with the HTTP status in its message and plain ``requests``
errors; they become :class:`RayUnavailable` (unreachable, refused, bad token), :class:`JobNotFound`
(the cluster does not know the submission id) and, for a submission only, :class:`SubmissionRefused`
(Ray says this request is invalid: asking again cannot help) here, so callers never parse text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "preload",
    "RayJobs",
    "RayUnavailable",
    "JobNotFound",
    "SubmissionRefused",
    "JobState",
    "TERMINAL_RAY",
]

log = logging.getLogger("hdet.service")
T = TypeVar("T")

#: Ray's terminal job statuses.
TERMINAL_RAY = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class RayUnavailable(Exception):
    """Ray's Jobs API did not answer, or refused the request; the message says which (never a token)."""


class JobNotFound(Exception):
    """Ray does not know this submission id (never submitted, or the head restarted)."""


class SubmissionRefused(Exception):
    """Ray refused a job submission as invalid (its client's checks, or an HTTP 400); the message is Ray's."""


@dataclass(frozen=True)
class JobState:
    """What Ray says about one job."""

    submission_id: str
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str | None = None
    exit_code: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    job_id: str | None = None  # the driver's Ray job id (hex) once it started: its placement groups carry it

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_RAY


def preload() -> None:
    """Import Ray's Jobs client (600+ modules) now rather than at the first submission."""
    import requests  # noqa: F401
    from ray.job_submission import JobSubmissionClient  # noqa: F401


def _client_class() -> type:
    from ray.job_submission import JobSubmissionClient

    class _TimedClient(JobSubmissionClient):  # type: ignore[misc, valid-type]
        """Ray's client sends its HTTP requests without a timeout: a hung head would hang us."""

        hdet_timeout_s: float = 10.0

        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self.hdet_timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

        def _check_connection_and_version(
            self, min_version: str = "1.9", version_error_message: str | None = None
        ) -> None:
            # Ray asks the cluster's version again before every submission with entrypoint
            # resources: a third of a submission's requests. A client is made afresh after any
            # failure, so a version it has checked once stays checked.
            checked: set[str] = self.__dict__.setdefault("_hdet_versions_ok", set())
            if min_version not in checked:
                super()._check_connection_and_version(min_version, version_error_message)
                checked.add(min_version)

    return _TimedClient


class RayJobs:
    """The Jobs API of one cluster; the client is made on first use and again after a failure."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 10.0):
        self.address = address.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else None
        self.timeout_s = timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                cls: Any = _client_class()
                cls.hdet_timeout_s = self.timeout_s
                self._client = cls(self.address, headers=dict(self._headers) if self._headers else None)
            return self._client

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        try:
            return fn(self._get_client())
        except Exception as e:
            raise self._classify(what, e) from None

    def _classify(self, what: str, e: Exception) -> Exception:
        import requests
        from ray.exceptions import AuthenticationError

        text = str(e)
        if isinstance(e, RuntimeError) and "status code 404" in text:
            return JobNotFound(what)
        with self._lock:
            self._client = None  # make a fresh one (and check the connection) next time
        if isinstance(e, AuthenticationError):
            return RayUnavailable(f"Ray at {self.address} refused the service's Ray token ({what})")
        if isinstance(e, requests.RequestException | OSError):
            return RayUnavailable(f"Ray at {self.address} is unreachable ({what}: {type(e).__name__})")
        return RayUnavailable(f"Ray at {self.address} refused {what}: {_first_line(text, e)}")

    # ------------------------------------------------------------------ calls

    def version(self) -> str:
        """The cluster's Ray version (a cheap "are you there")."""
        return self._call("a version check", lambda c: f"Jobs API version {c.get_version()}")

    def submit(self, submission_id: str, entrypoint: str, **options: Any) -> bool:
        """Submit a job under ``submission_id``; True if Ray already had it (a retried submission:
        no second job is ever started)."""
        try:
            client = self._get_client()
        except Exception as e:
            raise self._classify("a job submission", e) from None
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id, **options)
            return False
        except Exception as e:
            text = str(e)
            if "already exists" in text:
                return True
            if isinstance(e, TypeError | ValueError) or (
                isinstance(e, RuntimeError) and "status code 400" in text
            ):
                raise SubmissionRefused(_refusal(text, e)) from None
            raise self._classify("a job submission", e) from None

    def nodes(self) -> list[dict[str, float]]:
        """``resources_total`` of every alive node, as Ray's state API reports them."""

        def fetch(c: Any) -> Any:
            r = c._do_request("GET", "/api/v0/nodes?detail=true&limit=10000")
            if r.status_code != 200:
                raise RuntimeError(f"status code {r.status_code}: {r.text[:200]}")
            return r.json()["data"]["result"]["result"]

        rows = self._call("the node list", fetch)
        return [dict(n.get("resources_total") or {}) for n in rows if n.get("state") == "ALIVE"]

    def placement_groups(self) -> dict[str, list[dict[str, Any]]]:
        """The placement groups not removed (pending, created, rescheduling), by the Ray job id
        that made them: ``{"state": ..., "bundles": [{"CPU": 2.0}, ...]}`` each."""

        def fetch(c: Any) -> Any:
            query = "detail=true&limit=10000&filter_keys=state&filter_predicates=%21%3D&filter_values=REMOVED"
            r = c._do_request("GET", f"/api/v0/placement_groups?{query}")
            if r.status_code != 200:
                raise RuntimeError(f"status code {r.status_code}: {r.text[:200]}")
            return r.json()["data"]["result"]["result"]

        out: dict[str, list[dict[str, Any]]] = {}
        for pg in self._call("the placement groups", fetch):
            bundles = [dict(b.get("unit_resources") or {}) for b in pg.get("bundles") or []]
            out.setdefault(str(pg.get("creator_job_id")), []).append(
                {"state": pg.get("state"), "bundles": bundles}
            )
        return out

    def info(self, submission_id: str) -> JobState:
        info = self._call(f"job {submission_id}", lambda c: c.get_job_info(submission_id))
        return _state(info)

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job (SIGINT first, see the submission's runtime env); False if it had ended."""
        return bool(self._call(f"stopping {submission_id}", lambda c: c.stop_job(submission_id)))

    def logs(self, submission_id: str) -> str:
        return str(self._call(f"logs of {submission_id}", lambda c: c.get_job_logs(submission_id)))

    def list(self) -> list[JobState]:
        """Every job of the cluster, read from Ray's JSON as it comes (Ray's ``list_jobs`` makes a
        pydantic object of each job, entrypoint and all: most of a list of 800 jobs' time)."""

        def fetch(c: Any) -> Any:
            r = c._do_request("GET", "/api/jobs/")
            if r.status_code != 200:
                c._raise_error(r)  # a RuntimeError naming the status code, as list_jobs raises
            return r.json()

        return [_state_of(j) for j in self._call("the job list", fetch) if j.get("submission_id")]

    async def follow(self, submission_id: str) -> AsyncIterator[str]:
        """The job's log as it is written, from its start, until the job ends."""
        try:
            client = self._get_client()
        except Exception as e:
            raise self._classify(f"logs of {submission_id}", e) from None
        async for chunk in client.tail_job_logs(submission_id):
            yield chunk


def _refusal(text: str, e: Exception) -> str:
    """Ray's reason: an HTTP 400's body is a traceback whose last line is the error."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if isinstance(e, RuntimeError) and len(lines) > 1:
        return f"HTTP 400: {lines[-1].rstrip('.')[:300]}"
    return f"{type(e).__name__}: {_first_line(text, e)}"


def _first_line(text: str, e: Exception) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__


def _state_of(job: dict[str, Any]) -> JobState:
    """:func:`_state` of a job as Ray's Jobs API sends it (JSON)."""
    return JobState(
        submission_id=str(job["submission_id"]),
        status=str(job["status"]),
        message=job.get("message"),
        exit_code=job.get("driver_exit_code"),
        metadata=dict(job.get("metadata") or {}),
        job_id=job.get("job_id") or None,
    )


def _state(info: Any) -> JobState:
    status = getattr(info.status, "value", str(info.status))
    return JobState(
        submission_id=str(info.submission_id),
        status=str(status),
        message=info.message,
        exit_code=getattr(info, "driver_exit_code", None),
        metadata=dict(info.metadata or {}),
        job_id=getattr(info, "job_id", None) or None,
    )
