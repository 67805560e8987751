"""What ``POST /v1/experiments`` accepts: the body read (64 KiB at most), parsed (JSON or YAML),
validated by ``Spec.parse(check_paths=False)`` and by the rules only a service has. Every refusal is
a :class:`~service.problems.Problem` naming the field; nothing is stored before this passed.

The service's own rules: ``tracking.tracking_uri`` null or the service's MLflow (every experiment is
recorded where the service reads); a training run must fit the cluster's nodes
(:mod:`service.admission`), or it would wait forever; every path under the data roots, taken literally
(:mod:`service.paths`), and every ``runs:/`` reference a run of the service's MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from fastapi import Request

from service.admission import admission_problems
from service.paths import confine, run_refs
from service.problems import Problem, field_errors
from workers.spec import Spec, SpecError

__all__ = ["MAX_BODY_BYTES", "read_body", "parse_body", "validate", "canonical_json", "body_hash"]

MAX_BODY_BYTES = 64 * 1024
JSON_TYPES = frozenset({"application/json"})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})


def _media_type(request: Request) -> str:
    raw = request.headers.get("content-type", "")
    media = raw.split(";", 1)[0].strip().lower()
    if media in JSON_TYPES or media.endswith("+json"):
        return "json"
    if media in YAML_TYPES:
        return "yaml"
    accepted = ", ".join(sorted(JSON_TYPES | YAML_TYPES))
    raise Problem(
        415,
        "Unsupported Media Type",
        f"a spec is sent as JSON or YAML ({accepted}); got {raw or 'no Content-Type'}",
        kind="unsupported-media-type",
    )


async def read_body(request: Request) -> tuple[bytes, str]:
    """The request body (at most :data:`MAX_BODY_BYTES`) and its format, ``json`` or ``yaml``."""
    too_large = Problem(
        413, "Content Too Large", f"a spec is at most {MAX_BODY_BYTES} bytes", kind="body-too-large"
    )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    kind = _media_type(request)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks), kind


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: ``*a`` repeated is how a small document becomes a huge one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted", mark)
        return super().compose_node(parent, index)


def _invalid(problems: list[tuple[str, str]], detail: str = "the spec is invalid") -> Problem:
    return Problem(422, "Invalid spec", detail, kind="invalid-spec", errors=field_errors(problems))


def parse_body(raw: bytes, kind: str) -> dict[str, Any]:
    """The spec mapping of a body; 422 if it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid([("", "the body is not UTF-8 text")], "the body cannot be parsed") from None
    try:
        if kind == "json":
            docs = [json.loads(text, parse_constant=_no_constant)]
        else:
            docs = [d for d in yaml.load_all(text, Loader=_NoAliasLoader) if d is not None]
    except (ValueError, yaml.YAMLError) as e:
        raise _invalid(
            [("", f"cannot parse the {kind.upper()} body: {e}")], "the body cannot be parsed"
        ) from None
    if len(docs) != 1:
        raise _invalid([("", f"one spec per request; the body holds {len(docs)} documents")])
    data = docs[0]
    if not isinstance(data, dict):
        raise _invalid([("", f"a spec must be a mapping, got {type(data).__name__}")])
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def validate(
    data: dict[str, Any],
    *,
    tracking_uri: str,
    cluster: tuple[list[dict[str, float]], bool] | None,
    data_roots: Sequence[Path],
    run_exists: Callable[[str], bool] | None = None,
) -> Spec:
    """The validated spec, its paths placed under ``data_roots``: the spec's own rules, then the
    service's; 422 naming every bad field. ``run_exists(run_id)`` checks ``runs:/`` references;
    ``cluster`` is ``(nodes, autoscaling)`` of :func:`service.admission.admission_problems`."""
    try:
        spec = Spec.parse(data, check_paths=False)
    except SpecError as e:
        raise _invalid(e.problems) from None
    spec, problems = confine(spec, data_roots)
    if run_exists is not None:
        problems += [
            (field, f"no run {run_id!r} in this service's MLflow")
            for field, run_id in run_refs(spec)
            if not run_exists(run_id)
        ]
    uri = spec.tracking.tracking_uri
    if uri is not None and uri.rstrip("/") != tracking_uri.rstrip("/"):
        problems.append(
            (
                "tracking.tracking_uri",
                f"must be null or this service's MLflow ({tracking_uri}): the service reads every "
                "experiment's results there",
            )
        )
    if cluster is not None:
        nodes, autoscaling = cluster
        problems += admission_problems(spec, nodes, autoscaling=autoscaling)
    if problems:
        raise _invalid(problems)
    return spec


def canonical_json(spec: Spec) -> str:
    """The resolved spec as compact JSON with sorted keys: what is stored, submitted and hashed."""
    return json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))


def body_hash(spec_json: str) -> str:
    """Two bodies are "the same" for an idempotent repeat when their resolved specs are."""
    return hashlib.sha256(spec_json.encode()).hexdigest()
