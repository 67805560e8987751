"""The FastAPI application: :func:`create_app` wires settings, store, Ray, MLflow and the background
work (reconciler and submitter, :mod:`service.background`), and guards every route but
``/healthz``, ``/readyz``, ``/docs`` and ``/openapi.json`` with a token.

Tokens: ``HDET_API_TOKEN``, comma-separated during a rotation, each compared with
``hmac.compare_digest``; a missing or wrong one is 401 with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.background import Background, InProcess, InThreads
from service.db import Store
from service.experiments import Experiments
from service.jobs import RayJobs, RayUnavailable
from service.mlflow_view import MlflowUnavailable, MlflowView
from service.problems import Problem, install
from service.reconciler import Reconciler
from service.schemas import Component, Readiness, problem_responses
from service.settings import Settings
from service.submitter import Submitter

__all__ = ["create_app", "Service", "ServiceDep", "Fresh", "require_token"]

log = logging.getLogger("hdet.service")

#: how old an answer of Ray's node list, and of MLflow's health, a submission goes by
NODES_MAX_AGE_S = 10.0
MLFLOW_MAX_AGE_S = 2.0


T = TypeVar("T")


class Fresh(Generic[T]):
    """A network answer that requests read without waiting for it: the first read fetches it,
    a read after ``max_age_s`` gets the last answer and starts one background fetch of the next.
    ``fetch`` never raises (it returns what a failure means)."""

    def __init__(self, fetch: Callable[[], T], max_age_s: float):
        self._fetch = fetch
        self.max_age_s = max_age_s
        self._answer: tuple[float, T] | None = None
        self._lock = threading.Lock()
        self._fetching = False

    def get(self) -> T:
        answer = self._answer
        if answer is None:
            return self._refresh()
        if time.monotonic() - answer[0] > self.max_age_s:
            with self._lock:
                start, self._fetching = not self._fetching, True
            if start:
                threading.Thread(target=self._refresh, name="hdet-fresh", daemon=True).start()
        return answer[1]

    def _refresh(self) -> T:
        try:
            value = self._fetch()
            self._answer = (time.monotonic(), value)
            return value
        finally:
            self._fetching = False


@dataclass
class Service:
    """What the routes use, made once per application."""

    settings: Settings
    store: Store
    jobs: RayJobs
    mlflow: MlflowView
    experiments: Experiments
    #: the API process's own; they run where :attr:`background` says (a pass can be asked of it directly)
    reconciler: Reconciler
    submitter: Submitter
    #: where the reconciler and the submitter run: a process of their own, or threads of this one
    background: Background
    #: admits ``settings.submit_concurrency`` submissions at a time (a bulkhead): a submission is
    #: CPU (spec validation); with many at once, reads queue behind them
    submit_slots: asyncio.Semaphore
    #: the nodes Ray reports alive (None: Ray could not be asked), at most 10 s old
    nodes: Fresh[list[dict[str, float]] | None]
    #: why MLflow is unavailable (None: it answered), at most 2 s old
    mlflow_down: Fresh[str | None]

    def cluster_nodes(self) -> tuple[list[dict[str, float]], bool] | None:
        """The nodes a training can land on, and whether they are declared node types of an
        autoscaling cluster (``HDET_CLUSTER_NODE_TYPES``) rather than the nodes Ray reports alive;
        None when Ray could not be asked."""
        if self.settings.cluster_node_types is not None:
            return [dict(n) for n in self.settings.cluster_node_types], True
        nodes = self.nodes.get()
        return None if nodes is None else (nodes, False)


async def get_service(request: Request) -> Service:
    # async: a sync dependency would cost every request a hop to the thread pool and back
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:  # a request before the lifespan started (never under uvicorn)
        raise Problem(503, "Starting", "the service is starting", headers={"Retry-After": "1"})
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_token(request: Request) -> None:
    """401 unless ``Authorization: Bearer <one of the tokens>`` (async: no thread-pool hop)."""
    settings: Settings = request.app.state.settings
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    ok = False
    if scheme.lower() == "bearer" and given:
        # compare against every token (no early exit: the time does not say which one matched)
        for token in settings.tokens():
            ok |= hmac.compare_digest(given.strip().encode(), token.encode())
    if not ok:
        raise Problem(
            401,
            "Unauthorized",
            "send Authorization: Bearer <token> (HDET_API_TOKEN)" if not header else "the token is not valid",
            kind="unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="hdet"'},
        )


def build_service(settings: Settings) -> Service:
    """Open the store and make the clients (no network call: Ray and MLflow may be down)."""
    store = Store(settings.resolved_database_url())
    service_id = settings.service_name or store.service_id()
    assert settings.ray_address is not None
    jobs = RayJobs(settings.ray_address, settings.ray_token(), timeout_s=settings.ray_timeout_s)
    mlflow = MlflowView(settings.resolved_tracking_uri(), settings.ui_url())
    reconciler = Reconciler(store, jobs, mlflow, service_id, interval_s=settings.reconcile_interval_s)
    experiments = Experiments(store, jobs, mlflow, settings, service_id)
    submitter = Submitter(
        store, experiments, idle_s=settings.reconcile_interval_s, max_active=settings.max_active
    )
    background: Background = (
        InThreads(reconciler, submitter) if settings.background == "thread" else InProcess(settings)
    )
    slots = asyncio.Semaphore(settings.submit_concurrency)

    def nodes() -> list[dict[str, float]] | None:
        try:
            return jobs.nodes()
        except RayUnavailable:
            return None

    def mlflow_down() -> str | None:
        try:
            mlflow.ping()
            return None
        except MlflowUnavailable as e:
            return str(e)

    return Service(
        settings, store, jobs, mlflow, experiments, reconciler, submitter, background, slots,
        nodes=Fresh(nodes, NODES_MAX_AGE_S), mlflow_down=Fresh(mlflow_down, MLFLOW_MAX_AGE_S),
    )  # fmt: skip


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over ``settings`` (default: the environment). Refuses to start without a token."""
    settings = settings or Settings()
    settings.require_ready()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await run_in_threadpool(build_service, settings)
        app.state.service = service
        service.background.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.background.stop)
            service.store.close()
            app.state.service = None

    app = FastAPI(
        title="HarmonicDet",
        version="1",
        summary="Submit, follow, cancel and compare HarmonicDet experiments (Ray jobs tracked in MLflow).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    install(app)

    from service.routes import router

    # every /v1 route needs the token: each may answer 401
    app.include_router(router, dependencies=[Depends(require_token)], responses=problem_responses(401))

    @app.get("/healthz", tags=["health"], summary="The process is alive (no dependency checked).")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=Readiness,
        # not ready is a report, not an error: the same Readiness document, with the failing component
        responses={503: {"model": Readiness, "description": "not ready: `components` says which one fails"}},
        summary="Whether the database, Ray and MLflow answer and the first reconciliation ran.",
    )
    def readyz(service: ServiceDep) -> JSONResponse:
        passed, detail = service.background.readiness()
        components = {
            "database": _check(service.store.ping),
            "ray": _check(service.jobs.version),
            "mlflow": _check(service.mlflow.ping),
            "reconciler": Component(ok=passed, detail=detail),
        }
        ready = all(c.ok for c in components.values())
        body = Readiness(ready=ready, components=components)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)

    return app


def _check(fn: object) -> Component:
    try:
        result = fn()  # type: ignore[operator]
    except Exception as e:
        return Component(ok=False, detail=str(e) or type(e).__name__)
    return Component(ok=True, detail=f"ok ({result})" if isinstance(result, str) else "ok")
