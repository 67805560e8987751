"""The OpenAPI document types every answer, and the answers are what it says: each 2xx JSON
response has a schema with properties, each route documents exactly the errors it gives, each as a
problem document (never FastAPI's own 422 shape), and real answers of the results, compare and
schema routes (and their errors, a refused parameter of every route that documents 422 among them)
validate against the declared models and against the document's JSON Schema.

The answers come from an API over the session's Ray and MLflow (``hdet serve``'s) with a database
of its own, holding finished experiments whose runs are written to MLflow as a job writes them (a
single run of two seeds, a comparison of two arms on three seeds): no training is needed.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from pydantic import BaseModel
from svc_helpers import NEVER, Stack, auth, settings_for, tiny_spec

from service.app import create_app
from service.db import Store
from service.intake import body_hash, canonical_json
from service.models import ExperimentRow
from service.problems import PROBLEM_JSON
from service.schemas import Comparison, ExperimentResults, ProblemDocument, SpecSchema
from service.settings import Settings
from service.states import Status
from workers.spec import Spec
from workers.tracking import CHILD_ROLE, PARENT_ROLE, Artifact, Tag

MLFLOW_EXPERIMENT = "svc-openapi"
#: keys of a schema that describe it without constraining anything
_ANNOTATIONS = {"title", "description", "examples", "default"}


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _typed(doc: dict[str, Any], schema: Any) -> bool:
    """Whether ``schema`` says what the answer holds: not ``{}``, not an object without properties."""
    if not isinstance(schema, dict):
        return False
    schema = _resolve(doc, schema)
    if not set(schema) - _ANNOTATIONS:
        return False
    if schema.get("type", "object") == "object" and not any(k in schema for k in ("anyOf", "oneOf", "allOf")):
        return bool(schema.get("properties")) or _typed(doc, schema.get("additionalProperties"))
    return True


def _openapi(tmp_path: Path) -> dict[str, Any]:
    settings = Settings(
        api_token="token-one-0123456789abcdef0123456789",
        database_url=f"sqlite:///{tmp_path / 'service.db'}",
        ray_address="http://127.0.0.1:1",
        mlflow_tracking_uri="http://127.0.0.1:1",
    )
    return create_app(settings).openapi()


def test_every_2xx_json_answer_of_the_openapi_document_has_a_schema_with_properties(tmp_path: Path) -> None:
    doc = _openapi(tmp_path)
    answers = [
        (f"{method.upper()} {path} {status}", body["schema"])
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        for status, response in op["responses"].items()
        if status.startswith("2")
        for media, body in response.get("content", {}).items()
        if media.endswith("json")
    ]
    assert len(answers) >= 10
    untyped = [where for where, schema in answers if not _typed(doc, schema)]
    assert not untyped, f"answers without a schema: {untyped}"


def test_results_compare_and_schema_document_their_markdown_and_problem_answers(tmp_path: Path) -> None:
    doc = _openapi(tmp_path)
    results = doc["paths"]["/v1/experiments/{exp_id}/results"]["get"]["responses"]
    assert results["200"]["content"]["text/markdown"]["schema"] == {"type": "string"}
    routes = {
        "/v1/experiments/{exp_id}/results": {"401", "404", "422", "503"},
        "/v1/compare": {"401", "422", "503"},
        "/v1/spec/schema": {"401"},
    }
    for path, statuses in routes.items():
        responses = doc["paths"][path]["get"]["responses"]
        assert {s for s in responses if not s.startswith("2")} == statuses, path
        for status in statuses:
            (media,) = responses[status]["content"]
            schema = responses[status]["content"][media]["schema"]
            assert media == "application/problem+json" and {"type", "title", "status"} <= set(
                schema["required"]
            )


RESULTS = "/v1/experiments/{exp_id}/results"
#: the error statuses each route can give: no more, no fewer
ERRORS = {
    ("post", "/v1/experiments"): {"401", "413", "415", "422", "503"},
    ("get", "/v1/experiments"): {"401", "422"},
    ("get", "/v1/experiments/{exp_id}"): {"401", "404"},
    ("post", "/v1/experiments/{exp_id}/cancel"): {"401", "404", "409"},
    ("get", "/v1/experiments/{exp_id}/logs"): {"401", "404", "422", "503"},
    ("get", "/v1/experiments/{exp_id}/events"): {"401", "404", "422"},
    ("get", RESULTS): {"401", "404", "422", "503"},
    ("get", "/v1/compare"): {"401", "422", "503"},
    ("get", "/v1/spec/schema"): {"401"},
    ("get", "/healthz"): set(),
    ("get", "/readyz"): {"503"},
}
#: the schemas of a parameter that any value passes (a path segment, an optional string)
_ANY_STRING = [{"type": "string"}, {"anyOf": [{"type": "string"}, {"type": "null"}]}]


def _refusable(doc: dict[str, Any], parameter: dict[str, Any]) -> bool:
    """Whether FastAPI can refuse ``parameter``: required outside the path, or typed or bounded."""
    if parameter.get("required") and parameter["in"] != "path":
        return True
    schema = {k: v for k, v in _resolve(doc, parameter["schema"]).items() if k not in _ANNOTATIONS}
    return schema not in _ANY_STRING


def test_every_route_documents_exactly_its_errors_and_each_as_a_problem_document(tmp_path: Path) -> None:
    doc = _openapi(tmp_path)
    assert "ValidationError" not in json.dumps(doc)  # FastAPI's 422 shape, and its schemas, are gone
    operations = {(method, path): op for path, ops in doc["paths"].items() for method, op in ops.items()}
    assert set(operations) == set(ERRORS), "a route was added or removed: say which errors it gives"
    for (method, path), op in operations.items():
        where = f"{method.upper()} {path}"
        errors = {status: r for status, r in op["responses"].items() if not status.startswith("2")}
        assert set(errors) == ERRORS[method, path], where
        if op.get("requestBody") or any(_refusable(doc, p) for p in op.get("parameters", [])):
            assert "422" in errors, f"{where} takes input FastAPI can refuse but documents no 422"
        for status, response in errors.items():
            if (path, status) == ("/readyz", "503"):  # not ready: the readiness report itself
                assert set(response["content"]) == {"application/json"}
                assert response["content"]["application/json"]["schema"]["$ref"].endswith("/Readiness")
                continue
            assert set(response["content"]) == {PROBLEM_JSON}, f"{where} {status}"
            schema = _resolve(doc, response["content"][PROBLEM_JSON]["schema"])
            assert {"type", "title", "status"} <= set(schema["required"]), f"{where} {status}"
            assert response["description"] != "Validation Error", f"{where} {status}"


# ---------------------------------------------------------------------- real answers


def _record(store: Store, name: str, kind: str, status: Status, parent: Any = None) -> str:
    """A record as the service leaves an experiment that ended ``status`` (its MLflow parent run
    ``parent``, None when it never started)."""
    exp_id = f"exp-{secrets.token_hex(8)}"
    spec_json = canonical_json(
        Spec.parse(tiny_spec(name, **{"tracking.experiment": MLFLOW_EXPERIMENT}), check_paths=False)
    )
    row = ExperimentRow(
        id=exp_id, name=name, kind=kind, loss="harmonicdet", arch="retinanet", spec=spec_json,
        body_hash=body_hash(spec_json), idempotency_key=None,
        mlflow_experiment_id=parent.info.experiment_id if parent else None,
        mlflow_parent_run_id=parent.info.run_id if parent else None,
    )  # fmt: skip
    store.insert_accepted(row, "accepted")
    path = [Status.CANCELLED] if status == Status.CANCELLED else [Status.PENDING, Status.RUNNING, status]
    current = Status.SUBMITTING
    for to in path:
        assert store.transition(exp_id, current, to, "as the job ended")
        current = to
    return exp_id


def _child(
    c: MlflowClient, parent: Any, seed: int, metrics: dict[str, float], model: Path | None = None, **tags: str
) -> None:
    """A finished training run of ``parent``, with ``model`` as its checkpoint when given."""
    run = c.create_run(
        parent.info.experiment_id,
        tags={"mlflow.parentRunId": parent.info.run_id, Tag.ROLE: CHILD_ROLE, Tag.SEED: str(seed), **tags},
    )
    for name, value in {"epoch": 1.0, **metrics}.items():
        c.log_metric(run.info.run_id, name, value, step=1)
    if model is not None:
        c.log_artifact(run.info.run_id, str(model), Artifact.CHECKPOINT_DIR)
    c.set_terminated(run.info.run_id, "FINISHED")


def _single_run(c: MlflowClient, eid: str, folder: Path) -> Any:
    """A parent run with two finished training runs (val and test metrics), one with a checkpoint."""
    parent = c.create_run(eid, tags={Tag.ROLE: PARENT_ROLE, Tag.SPEC_NAME: "openapi-run"})
    c.log_param(parent.info.run_id, "train.epochs", "1")
    model = folder / Artifact.MODEL_FILE
    model.write_bytes(b"not a real state_dict")
    for seed, ap in enumerate([0.30, 0.32]):
        metrics = {
            m: ap * k for m, k in {"AP": 1.0, "AP50": 1.5, "AP75": 0.9, "AP90": 0.5, "aic": 0.7}.items()
        }
        both = {**metrics, **{f"test_{m}": v for m, v in metrics.items()}}
        _child(c, parent, seed, both, model if seed == 0 else None)
    c.set_terminated(parent.info.run_id, "FINISHED")
    return c.get_run(parent.info.run_id)


def _comparison(c: MlflowClient, eid: str) -> Any:
    """A comparison's parent run (an empty search space): baseline and confirmatory on 3 seeds."""
    parent = c.create_run(eid, tags={Tag.ROLE: PARENT_ROLE, Tag.SPEC_NAME: "openapi-comparison"})
    for key, value in {
        "search.algorithm": "random",
        "search.seeds": "[0, 1, 2]",
        "train.epochs": "1",
    }.items():
        c.log_param(parent.info.run_id, key, value)
    for arm, aps in {"baseline": [0.30, 0.31, 0.29], "confirmatory": [0.36, 0.35, 0.37]}.items():
        for seed, ap in enumerate(aps):
            tags = {Tag.TRIAL_ID: arm, Tag.ARM: arm, Tag.CONFIG: json.dumps({"loss.kind": arm})}
            metrics = {"AP": ap, "test_AP": ap, "test_AP50": ap + 0.2, "test_aic": 0.3 - ap / 10}
            _child(c, parent, seed, metrics, **tags)
    c.set_terminated(parent.info.run_id, "FINISHED")
    return c.get_run(parent.info.run_id)


@pytest.fixture(scope="module")
def seen(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """What the API answers for a finished single run, a finished comparison, an experiment
    cancelled before it started, the spec's schema, and two errors; with its OpenAPI document."""
    tmp = tmp_path_factory.mktemp("openapi")
    db = tmp / "service.db"
    c = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp = c.get_experiment_by_name(MLFLOW_EXPERIMENT)
    eid = exp.experiment_id if exp else c.create_experiment(MLFLOW_EXPERIMENT)
    store = Store(f"sqlite:///{db}")
    try:
        ids = {
            "run": _record(store, "openapi-run", "run", Status.SUCCEEDED, _single_run(c, eid, tmp)),
            "comparison": _record(
                store, "openapi-comparison", "search", Status.SUCCEEDED, _comparison(c, eid)
            ),
            "never": _record(store, "openapi-never", "run", Status.CANCELLED),
        }
    finally:
        store.close()
    with TestClient(create_app(settings_for(stack, db, entrypoint_resources=NEVER))) as client:

        def get(path: str, **params: str) -> Any:
            return client.get(path, params=params, headers=auth())

        one = f"/v1/experiments/{ids['run']}"
        too_long_key = {"Content-Type": "application/json", "Idempotency-Key": "k" * 201, **auth()}
        # for every route that documents 422, a request with an input FastAPI refuses, and its field
        refused = {
            ("post", "/v1/experiments"): (
                client.post("/v1/experiments", content=json.dumps(tiny_spec()), headers=too_long_key),
                "idempotency-key",
            ),
            ("get", "/v1/experiments"): (get("/v1/experiments", limit="0"), "limit"),
            ("get", "/v1/experiments/{exp_id}/logs"): (get(f"{one}/logs", tail="0"), "tail"),
            ("get", "/v1/experiments/{exp_id}/events"): (get(f"{one}/events", after="-1"), "after"),
            ("get", RESULTS): (get(f"{one}/results", format="nope"), "format"),
            ("get", "/v1/compare"): (get("/v1/compare"), "ids"),
        }

        yield {
            "doc": client.get("/openapi.json").json(),
            "ids": ids,
            "results_run": get(f"/v1/experiments/{ids['run']}/results"),
            "results_comparison": get(f"/v1/experiments/{ids['comparison']}/results"),
            "results_markdown": get(f"/v1/experiments/{ids['comparison']}/results", format="markdown"),
            "compare": get("/v1/compare", ids=",".join([ids["run"], ids["comparison"], ids["never"]])),
            "schema": get("/v1/spec/schema"),
            "not_found": get("/v1/experiments/exp-0000000000000000/results"),
            "bad_ids": get("/v1/compare", ids=ids["run"]),
            "refused": refused,
            "listed": get("/v1/experiments", limit="200"),
        }


def _check(
    doc: dict[str, Any], path: str, status: int, response: Any, model: type[BaseModel], method: str = "get"
) -> Any:
    """``response`` is ``model``, and valid against what the document declares for it."""
    assert response.status_code == status, response.text
    op = doc["paths"][path][method]["responses"][str(status)]
    media = response.headers["content-type"].split(";")[0]
    body = response.json()
    jsonschema.validate(body, {**op["content"][media]["schema"], "components": doc["components"]})
    validated = model.model_validate(body)
    assert not _undocumented(validated), f"keys the schema does not declare: {_undocumented(validated)}"
    return validated


def _undocumented(value: Any, where: str = "") -> list[str]:
    """Paths of the keys a model took in without declaring them (``extra="allow"``)."""
    if isinstance(value, BaseModel):
        found = [f"{where}.{key}" for key in value.model_extra or {}]
        for name in type(value).model_fields:
            found += _undocumented(getattr(value, name), f"{where}.{name}")
        return found
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _undocumented(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _undocumented(v, f"{where}[{i}]")]
    return []


def test_the_results_of_a_finished_run_are_what_the_document_declares(seen: dict[str, Any]) -> None:
    res = _check(seen["doc"], RESULTS, 200, seen["results_run"], ExperimentResults)
    assert res.id == seen["ids"]["run"] and res.status == "SUCCEEDED" and res.partial is False
    assert res.summary is None and res.parent is not None and res.parent.status == "FINISHED"
    assert [r.seed for r in res.runs] == [0, 1]
    assert res.runs[0].checkpoint == f"runs:/{res.runs[0].run_id}/checkpoint/model.pt"
    assert res.runs[1].checkpoint is None and res.runs[1].metrics["test_AP"] == pytest.approx(0.32)
    body = seen["results_run"].json()
    assert "checkpoint" not in body["parent"] and all("checkpoint" in r for r in body["runs"])


def test_the_results_of_a_finished_comparison_carry_its_evidence_as_declared(seen: dict[str, Any]) -> None:
    res = _check(seen["doc"], RESULTS, 200, seen["results_comparison"], ExperimentResults)
    assert res.summary is not None and res.summary.judged_on == "test"
    assert res.summary.baseline is not None and res.summary.confirmatory is not None
    ap = res.summary.confirmatory_comparison["AP"]
    assert ap.role == "primary" and ap.n_pairs == 3 and ap.mean_diff == pytest.approx(0.06)
    assert sorted(ap.per_seed) == ["0", "1", "2"]
    md = seen["results_markdown"]
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert "text/markdown" in seen["doc"]["paths"][RESULTS]["get"]["responses"]["200"]["content"]


def test_a_comparison_of_a_run_a_comparison_and_an_unstarted_experiment_is_as_declared(
    seen: dict[str, Any],
) -> None:
    comp = _check(seen["doc"], "/v1/compare", 200, seen["compare"], Comparison)
    ids = seen["ids"]
    assert [e.id for e in comp.experiments] == [ids["run"], ids["comparison"], ids["never"]]
    assert comp.judged_on == "val"  # the unstarted one has no test metrics
    run, comparison, never = comp.experiments
    assert run.seeds == [0, 1] and comparison.arm == "confirmatory" and never.seeds == []
    against_comparison, against_never = comp.paired[ids["comparison"]], comp.paired[ids["never"]]
    assert against_comparison.shared_seeds == [0, 1] and against_comparison.comparison is not None
    assert against_never.comparison is None and against_never.note
    body = seen["compare"].json()
    assert "note" not in body["paired"][ids["comparison"]]  # absent, not null, when there is a comparison


def test_the_spec_schema_is_as_declared_and_sent_as_the_json_the_spec_makes(seen: dict[str, Any]) -> None:
    schema = _check(seen["doc"], "/v1/spec/schema", 200, seen["schema"], SpecSchema)
    assert "loss" in schema.properties and "name" in schema.required
    made = json.dumps(Spec.model_json_schema(), ensure_ascii=False, separators=(",", ":"))
    assert seen["schema"].content == made.encode()


def test_errors_are_the_problem_documents_the_document_declares(seen: dict[str, Any]) -> None:
    problem = _check(seen["doc"], RESULTS, 404, seen["not_found"], ProblemDocument)
    assert problem.status == 404 and problem.instance == "/v1/experiments/exp-0000000000000000/results"
    problem = _check(seen["doc"], "/v1/compare", 422, seen["bad_ids"], ProblemDocument)
    assert problem.errors is not None and problem.errors[0].field == "ids"


def test_a_refused_input_is_the_problem_document_each_route_declares_for_422(seen: dict[str, Any]) -> None:
    doc, refused = seen["doc"], seen["refused"]
    documented = {
        (m, p) for p, ops in doc["paths"].items() for m, op in ops.items() if "422" in op["responses"]
    }
    assert set(refused) == documented  # a request gets every 422 the document declares
    for (method, path), (response, field) in refused.items():
        assert response.headers["content-type"] == PROBLEM_JSON, (method, path)
        problem = _check(doc, path, 422, response, ProblemDocument, method)
        assert problem.type.endswith("/invalid-request") and problem.instance == response.request.url.path
        assert problem.errors is not None and [e.field for e in problem.errors] == [field], (method, path)
    assert seen["listed"].status_code == 200
    assert seen["listed"].json()["items"] and not any(
        i["name"] == tiny_spec()["name"] for i in seen["listed"].json()["items"]
    )  # the refused submission stored nothing
