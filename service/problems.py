"""Errors as RFC 9457 ``application/problem+json``: the one shape of every error the API returns.
Routes raise :class:`Problem`; :func:`install` makes FastAPI's own errors (404, 405, bad query
parameters, unexpected exceptions) the same shape, and the OpenAPI document says so.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["Problem", "PROBLEM_JSON", "install", "problem_response", "field_errors"]

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://harmonicdet.dev/problems/"
log = logging.getLogger("hdet.service")
#: the schemas of FastAPI's own 422 answer, a shape this API never sends
_FASTAPI_422 = ("HTTPValidationError", "ValidationError")


class Problem(Exception):
    """An error response: ``status``, a short ``title``, the ``detail`` of this occurrence, and for
    invalid input ``errors = [{field, message}]`` naming full field paths (``loss.gamma``)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        kind: str | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind
        self.errors = errors
        self.headers = headers or {}

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": _TYPE_BASE + self.kind if self.kind else "about:blank",
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            out["detail"] = self.detail
        if instance:
            out["instance"] = instance
        if self.errors is not None:
            out["errors"] = self.errors
        return out


def field_errors(problems: list[tuple[str, str]]) -> list[dict[str, str]]:
    """``[(field path, message)]`` as the ``errors`` member."""
    return [{"field": path, "message": msg} for path, msg in problems]


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(instance), status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers
    )


def _without_fastapi_422(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (changed in place) without FastAPI's own 422 answer, which it adds to every route
    with a parameter; each route's ``responses=`` documents the 422 it gives, as a problem."""
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {}) if isinstance(operation, dict) else {}
            ref = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if ref.get("$ref", "").rsplit("/", 1)[-1] in _FASTAPI_422:
                del responses["422"]
    schemas = doc.get("components", {}).get("schemas", {})
    for name in _FASTAPI_422:
        schemas.pop(name, None)
    return doc


def install(app: FastAPI) -> None:
    """Every error of ``app`` becomes problem+json, and its OpenAPI document has no other error shape."""
    generate = app.openapi  # FastAPI's: made once, then cached (again when the routes change)

    def openapi() -> dict[str, Any]:
        return _without_fastapi_422(generate())

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        from http import HTTPStatus

        title = (
            HTTPStatus(exc.status_code).phrase
            if exc.status_code in HTTPStatus._value2member_map_
            else "Error"
        )
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        return problem_response(
            Problem(exc.status_code, title, detail, headers=dict(exc.headers or {})), request.url.path
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            # ("query", "limit") -> "limit": the parameter's own name is the field
            field = ".".join(loc[1:] if loc and loc[0] in ("query", "path", "header", "body") else loc)
            errors.append({"field": field, "message": str(err.get("msg", "invalid"))})
        problem = Problem(
            422, "Invalid request", "a parameter is invalid", kind="invalid-request", errors=errors
        )
        return problem_response(problem, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        problem = Problem(
            500, "Internal Server Error", "an unexpected error; the service log has the details"
        )
        return problem_response(problem, request.url.path)
