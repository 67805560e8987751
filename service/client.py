"""A typed Python client of the HarmonicDet REST API (httpx): submit, follow, cancel and compare
experiments from a laptop or a script, as ``hdet submit`` / ``status`` / ``logs`` do.

    from service.client import Client

    with Client() as api:
        exp = api.submit("configs/tiny.yaml")
        for chunk in api.follow_logs(exp.id):
            print(chunk, end="")
        print(api.wait(exp.id).status, api.results(exp.id)["runs"])

Where it connects: ``url`` and ``token`` given, else ``HDET_API_URL`` (default
``http://127.0.0.1:8000``) and ``HDET_API_TOKEN`` (the first of a comma-separated rotation), else
the token file ``$HDET_HOME/api-token`` that ``hdet serve`` writes. Every error the API answers
(RFC 9457 problem documents) and every failure to reach it is one exception, :class:`ApiError`.

Records, pages and events are the service's own models (:mod:`service.schemas`); results and
comparisons are the plain JSON the service assembles from MLflow, typed here as ``TypedDict``.
"""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import httpx

from service.schemas import Event, EventList, Experiment, ExperimentList
from service.states import TERMINAL

__all__ = [
    "Client",
    "ApiError",
    "FieldError",
    "Experiment",
    "ExperimentList",
    "Event",
    "RunView",
    "Results",
    "ComparedExperiment",
    "Paired",
    "Comparison",
    "DEFAULT_URL",
    "resolve_url",
    "resolve_token",
]

DEFAULT_URL = "http://127.0.0.1:8000"
_YAML_SUFFIXES = (".yaml", ".yml")


class FieldError(TypedDict):
    """One invalid input of a 422: its full path (``loss.gamma``) and what is wrong with it."""

    field: str
    message: str


class RunView(TypedDict):
    """One MLflow run of an experiment, as ``GET /v1/experiments/{id}/results`` lists it."""

    run_id: str
    name: str | None
    status: str
    role: str | None
    seed: int | None
    trial_id: str | None
    arm: str | None
    metrics: dict[str, float | None]
    error: str | None
    link: str | None
    checkpoint: NotRequired[str | None]  # child runs only: runs:/<id>/checkpoint/model.pt


class Results(TypedDict):
    """An experiment's results from MLflow (``partial`` while it runs; no parent before it starts)."""

    id: str
    status: str
    partial: bool
    parent: RunView | None
    runs: list[RunView]
    summary: dict[str, Any] | None  # a search's SearchSummary.to_dict(); None for one training run


class ComparedExperiment(TypedDict):
    """One experiment of ``/v1/compare``: its parent run's params and MLflow link, and the
    seeds of the configuration compared (``arm``: a run's ``run``, a search's ``best``, a
    comparison's ``confirmatory``) with their metrics and child run ids."""

    id: str
    name: str
    kind: str
    loss: str
    arch: str
    status: str
    params: dict[str, str]
    parent_run_id: str | None
    mlflow_experiment_id: str | None
    link: str | None
    arm: str | None
    config: dict[str, Any] | None
    seeds: list[int]
    mean: dict[str, float | None]
    per_seed: dict[str, dict[str, float | None]]
    runs: dict[str, str]  # seed -> MLflow run id


class Paired(TypedDict):
    """One experiment against the first: ``comparison`` is metric -> ``compare_metrics`` entry."""

    against: str
    shared_seeds: list[int]
    comparison: dict[str, dict[str, Any]] | None
    note: NotRequired[str]


class Comparison(TypedDict):
    judged_on: str  # "test" when every experiment has held-out metrics, else "val"
    metrics: list[str]
    experiments: list[ComparedExperiment]
    paired: dict[str, Paired]
    mlflow_compare: str | None  # MLflow's own compare view of the compared runs


class ApiError(Exception):
    """What the API refused (its problem document) or why it could not be reached.

    Attributes:
        status: the HTTP status; None when no answer came (connection refused, timeout).
        title, detail: the problem's summary and this occurrence's explanation.
        errors: for invalid input, every bad field with its message.
        type: the problem type URI (``.../problems/invalid-spec``); ``about:blank`` if none.
    """

    def __init__(
        self,
        status: int | None,
        title: str,
        detail: str | None = None,
        *,
        errors: Sequence[FieldError] = (),
        type: str = "about:blank",
        hint: str | None = None,
    ):
        self.status = status
        self.title = title
        self.detail = detail
        self.errors: list[FieldError] = list(errors)
        self.type = type
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{self.status} {self.title}" if self.status is not None else self.title
        if self.detail:
            head += f": {self.detail}"
        lines = [head, *(f"  {e['field']}: {e['message']}" for e in self.errors)]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)

    @property
    def fields(self) -> list[str]:
        """The paths of the invalid fields (empty unless the input was refused)."""
        return [e["field"] for e in self.errors]

    def __reduce__(self) -> Any:
        kwargs = {"errors": self.errors, "type": self.type, "hint": self.hint}
        return (_rebuild_api_error, (self.status, self.title, self.detail, kwargs))


def _rebuild_api_error(status: int | None, title: str, detail: str | None, kwargs: Any) -> ApiError:
    return ApiError(status, title, detail, **kwargs)


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``HDET_API_URL``, else :data:`DEFAULT_URL`, without a trailing slash."""
    return (url or os.environ.get("HDET_API_URL") or DEFAULT_URL).rstrip("/")


def resolve_token(token: str | None = None) -> str | None:
    """``token``, else the first of ``HDET_API_TOKEN``, else ``$HDET_HOME/api-token``; None if none."""
    if token:
        return token.strip()
    env = [t.strip() for t in os.environ.get("HDET_API_TOKEN", "").split(",") if t.strip()]
    if env:
        return env[0]
    from workers.env import hdet_home

    path = hdet_home() / "api-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Client:
    """The HarmonicDet API at ``url`` with the bearer ``token`` (see the module docstring for
    the defaults). ``timeout`` bounds every request but a followed log, which waits as long as
    the job is silent. Usable as a context manager; thread-safe as httpx.Client is."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = resolve_url(url)
        self.token = resolve_token(token)
        self.timeout = timeout
        headers = {"Accept": "application/json, application/problem+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ experiments

    def submit(self, spec: dict[str, Any] | str | Path, *, idempotency_key: str | None = None) -> Experiment:
        """Submit a spec (a mapping, or a YAML/JSON file's path); the new record, ``SUBMITTING``.
        With ``idempotency_key`` a repeat of the same body gets the same record."""
        if isinstance(spec, dict):
            body, media = json.dumps(spec).encode(), "application/json"
        else:
            path = Path(spec)
            body = path.read_bytes()
            media = "application/yaml" if path.suffix.lower() in _YAML_SUFFIXES else "application/json"
        headers = {"Content-Type": media}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        r = self._request("POST", "/v1/experiments", content=body, headers=headers)
        return Experiment.model_validate_json(r.content)

    def get(self, exp_id: str) -> Experiment:
        """One experiment's record."""
        return Experiment.model_validate_json(self._request("GET", _exp(exp_id)).content)

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        name: str | None = None,
        loss: str | None = None,
        arch: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ExperimentList:
        """One page of experiments, newest first; pass ``next_cursor`` back for the next page."""
        if status is not None and not isinstance(status, str):
            status = ",".join(status)
        params = {
            "status": status,
            "name": name,
            "loss": loss,
            "arch": arch,
            "limit": limit,
            "cursor": cursor,
        }
        query = {k: v for k, v in params.items() if v is not None}
        return ExperimentList.model_validate_json(
            self._request("GET", "/v1/experiments", params=query).content
        )

    def cancel(self, exp_id: str) -> Experiment:
        """Ask for the experiment to stop: ``CANCELLING`` now, ``CANCELLED`` once Ray stopped it.
        A repeat is a no-op; an ended experiment is an ApiError 409."""
        return Experiment.model_validate_json(self._request("POST", f"{_exp(exp_id)}/cancel").content)

    def logs(self, exp_id: str, *, tail: int = 1000) -> str:
        """The job's log so far: its last ``tail`` lines."""
        return self._request("GET", f"{_exp(exp_id)}/logs", params={"tail": tail}).text

    def follow_logs(self, exp_id: str, *, tail: int = 1000) -> Iterator[str]:
        """The last ``tail`` lines, then what the job writes, until it ends (an ended job's log
        ends at once). The stream can end before the record says so; :meth:`wait` for the status."""
        timeout = httpx.Timeout(self.timeout, read=None)  # a training epoch can be silent for long
        params: dict[str, str | int] = {"tail": tail, "follow": "true"}
        try:
            with self._http.stream("GET", f"{_exp(exp_id)}/logs", params=params, timeout=timeout) as r:
                if r.is_error:
                    r.read()
                    raise _problem(r, self.token)
                yield from r.iter_text()
        except httpx.HTTPError as e:
            raise _unreachable(self.url, e) from None

    def events(self, exp_id: str, *, after: int = 0) -> builtins.list[Event]:
        """The record's state transitions with ``seq > after``, oldest first."""
        r = self._request("GET", f"{_exp(exp_id)}/events", params={"after": after})
        return EventList.model_validate_json(r.content).items

    def results(self, exp_id: str) -> Results:
        """Parent and child runs from MLflow with their final metrics (partial while it runs)."""
        body: Results = self._request("GET", f"{_exp(exp_id)}/results").json()
        return body

    def results_text(self, exp_id: str, *, markdown: bool = False) -> str:
        """A search's or comparison's evidence as ``hdet run`` prints it (``markdown``: the report
        ``hdet report`` writes); a single run's table of training runs."""
        fmt = "markdown" if markdown else "text"
        return self._request("GET", f"{_exp(exp_id)}/results", params={"format": fmt}).text

    def compare(self, ids: Sequence[str]) -> Comparison:
        """2 to 10 experiments side by side, and paired differences of each against the first."""
        body: Comparison = self._request("GET", "/v1/compare", params={"ids": ",".join(ids)}).json()
        return body

    def spec_schema(self) -> dict[str, Any]:
        """The experiment spec's JSON Schema."""
        body: dict[str, Any] = self._request("GET", "/v1/spec/schema").json()
        return body

    def wait(self, exp_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None) -> Experiment:
        """The record once its status is terminal (SUCCEEDED, FAILED, CANCELLED, LOST), polled
        every ``poll_s``; TimeoutError after ``timeout_s`` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            exp = self.get(exp_id)
            if exp.status in TERMINAL:
                return exp
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{exp_id} is still {exp.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise _unreachable(self.url, e) from None
        if r.is_error:
            raise _problem(r, self.token)
        return r


def _exp(exp_id: str) -> str:
    # an id is exp-<hex>: quoting keeps a mistyped one (with / or ?) inside the path segment
    from urllib.parse import quote

    return f"/v1/experiments/{quote(exp_id, safe='')}"


def _problem(r: httpx.Response, token: str | None) -> ApiError:
    """The ApiError of an error response: its problem document, or the status and body if the
    answer is not one (a proxy's error page)."""
    try:
        body = r.json()
    except ValueError:
        body = None
    hint = None
    if r.status_code == 401:
        hint = (
            "no token was found: pass --token, set HDET_API_TOKEN, or set HDET_HOME to the folder of "
            "`hdet serve` (it writes api-token there)"
            if not token
            else "the token was refused: check --token / HDET_API_TOKEN / $HDET_HOME/api-token"
        )
    if isinstance(body, dict) and "title" in body:
        errors = [
            FieldError(field=str(e.get("field", "")), message=str(e.get("message", "")))
            for e in body.get("errors") or []
            if isinstance(e, dict)
        ]
        return ApiError(
            r.status_code,
            str(body["title"]),
            body.get("detail"),
            errors=errors,
            type=str(body.get("type", "about:blank")),
            hint=hint,
        )
    return ApiError(r.status_code, r.reason_phrase or "Error", r.text.strip()[:300] or None, hint=hint)


def _unreachable(url: str, e: httpx.HTTPError) -> ApiError:
    what = type(e).__name__
    detail = f"{what}: {e}" if str(e) else what
    return ApiError(
        None,
        f"cannot reach the HarmonicDet API at {url}",
        detail,
        hint="is `hdet serve` running there? (--url / HDET_API_URL)",
    )
