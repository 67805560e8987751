"""The FastAPI application: :func:`create_app` wires settings, store, Ray, MLflow and the reconciler,
and guards every route but ``/healthz``, ``/readyz``, ``/docs`` and ``/openapi.json`` with a token.

Tokens: ``HDET_API_TOKEN``, comma-separated during a rotation, each compared with
``hmac.compare_digest``; a missing or wrong one is 401 with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.db import Store
from service.experiments import Experiments
from service.jobs import RayJobs
from service.mlflow_view import MlflowView
from service.problems import Problem, install
from service.reconciler import Reconciler
from service.schemas import Component, Readiness
from service.settings import Settings

__all__ = ["create_app", "Service", "ServiceDep", "require_token"]

log = logging.getLogger("hdet.service")


@dataclass
class Service:
    """What the routes use, made once per application."""

    settings: Settings
    store: Store
    jobs: RayJobs
    mlflow: MlflowView
    experiments: Experiments
    reconciler: Reconciler
    #: admits ``settings.submit_concurrency`` submissions at a time (a bulkhead): a submission is
    #: CPU (spec validation) and a Ray request; with many at once, reads queued behind them
    submit_slots: asyncio.Semaphore
    _nodes: tuple[float, list[dict[str, float]]] | None = None

    def cluster_nodes(self, max_age_s: float = 10.0) -> tuple[list[dict[str, float]], bool]:
        """The nodes a training can land on, and whether they are declared node types of an
        autoscaling cluster (``HDET_CLUSTER_NODE_TYPES``) rather than the nodes Ray reports alive."""
        if self.settings.cluster_node_types is not None:
            return [dict(n) for n in self.settings.cluster_node_types], True
        now = time.monotonic()
        if self._nodes is None or now - self._nodes[0] > max_age_s:
            self._nodes = (now, self.jobs.nodes())
        return self._nodes[1], False


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
    reconciler = Reconciler(
        store,
        jobs,
        mlflow,
        service_id,
        interval_s=settings.reconcile_interval_s,
        submit_grace_s=max(60.0, 3 * settings.ray_timeout_s),
    )
    experiments = Experiments(store, jobs, mlflow, settings, service_id)
    slots = asyncio.Semaphore(settings.submit_concurrency)
    return Service(settings, store, jobs, mlflow, experiments, reconciler, slots)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over ``settings`` (default: the environment). Refuses to start without a token."""
    settings = settings or Settings()
    settings.require_ready()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await run_in_threadpool(build_service, settings)
        app.state.service = service
        service.reconciler.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.reconciler.stop)
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

    app.include_router(router, dependencies=[Depends(require_token)])

    @app.get("/healthz", tags=["health"], summary="The process is alive (no dependency checked).")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=Readiness,
        responses={503: {"model": Readiness}},
        summary="Whether the database, Ray and MLflow answer and the first reconciliation ran.",
    )
    def readyz(service: ServiceDep) -> JSONResponse:
        components = {
            "database": _check(service.store.ping),
            "ray": _check(service.jobs.version),
            "mlflow": _check(service.mlflow.ping),
            "reconciler": Component(
                ok=service.reconciler.ready.is_set(),
                detail="first pass done" if service.reconciler.ready.is_set() else "first pass not done yet",
            ),
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
