"""What the API refuses before anything is stored or submitted: requests without a valid token,
bad specs (422 naming the field), bodies too large (413) or of another media type (415); and what
it publishes without a token (health, readiness, docs). Real Ray and MLflow, a real SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import NEVER, TOKENS, Stack, auth, post_spec, settings_for, tiny_spec, wait_for

from service.app import create_app
from service.intake import MAX_BODY_BYTES
from service.settings import Settings, SettingsError
from workers.spec import Spec

OPEN = {"/healthz", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def client(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("guard") / "service.db"
    app = create_app(settings_for(stack, db, entrypoint_resources=NEVER))
    with TestClient(app) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 120, "the reconciler's first pass")
        yield c


def _ray_job_ids(client: TestClient) -> set[str]:
    service = client.app.state.service  # type: ignore[attr-defined]
    return {j.submission_id for j in service.jobs.list()}


def _row_count(client: TestClient) -> int:
    r = client.get("/v1/experiments", params={"limit": 200}, headers=auth())
    assert r.status_code == 200
    return len(r.json()["items"])


def _routes(client: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) of the API, as its OpenAPI document lists them."""
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), path.replace("{exp_id}", "exp-0000000000000000"))
        for path, ops in paths.items()
        for method in ops
    ]


def test_every_route_but_the_open_ones_needs_a_token(client: TestClient) -> None:
    guarded = [(m, p) for m, p in _routes(client) if p not in OPEN]
    assert len(guarded) >= 9
    for method, path in guarded:
        for headers in ({}, auth("wrong-token"), {"Authorization": f"Basic {TOKENS[0]}"}):
            r = client.request(method, path, headers=headers, params={"ids": "a,b"})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["content-type"].startswith(PROBLEM)
            assert TOKENS[0] not in r.text and TOKENS[1] not in r.text


def test_the_open_routes_answer_without_a_token(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:500])


def test_both_tokens_of_a_rotation_are_accepted(client: TestClient) -> None:
    for token in TOKENS:
        assert client.get("/v1/experiments", headers=auth(token)).status_code == 200


def test_the_api_refuses_to_start_without_a_token(stack: Stack, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="HDET_API_TOKEN"):
        create_app(settings_for(stack, tmp_path / "db", api_token=None))


def test_every_token_is_long_on_loopback_too(stack: Stack, tmp_path: Path) -> None:
    for host in ("0.0.0.0", "127.0.0.1"):
        with pytest.raises(ValueError, match="at least 32 characters"):
            settings_for(stack, tmp_path / "db", api_host=host, api_token="x")
        with pytest.raises(ValueError, match="at least 32 characters"):
            settings_for(stack, tmp_path / "db", api_host=host, api_token=f"{TOKENS[0]},{'y' * 31}")
    assert settings_for(stack, tmp_path / "db", api_host="0.0.0.0").api_host == "0.0.0.0"


def test_data_roots_must_be_absolute(stack: Stack, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HDET_DATA_ROOTS: data is not an absolute path"):
        settings_for(stack, tmp_path / "db", data_roots=f"{tmp_path}:data")
    got = settings_for(stack, tmp_path / "db", data_roots=f"{tmp_path}:/srv/coco").data_root_paths()
    assert got == [tmp_path, Path("/srv/coco")]
    assert settings_for(stack, tmp_path / "db").data_root_paths() == [stack.home / "data"]


def test_ray_address_overrides_that_disagree_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    with pytest.raises(ValueError, match="RAY_ADDRESS"):
        Settings(ray_address="http://127.0.0.1:8265", api_token="x")


def test_readyz_reports_each_component(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True
    assert set(body["components"]) == {"database", "ray", "mlflow", "reconciler"}
    assert all(c["ok"] for c in body["components"].values())


def test_spec_schema_is_the_specs_json_schema(client: TestClient) -> None:
    r = client.get("/v1/spec/schema", headers=auth())
    assert r.status_code == 200
    assert r.json() == Spec.model_json_schema()
    printed = subprocess.run(
        [sys.executable, "-m", "workers.cli", "spec", "schema"], capture_output=True, text=True, check=True
    ).stdout
    assert r.json() == json.loads(printed)


def _yaml(text: str) -> dict[str, Any]:
    return {"content": text, "headers": {"Content-Type": "application/yaml", **auth()}}


BAD_BODIES = [
    pytest.param(tiny_spec(**{"loss.gamma": 1.5}), "loss.gamma", id="gamma-out-of-range"),
    pytest.param(tiny_spec(**{"loss.bogus": 1}), "loss.bogus", id="unknown-key"),
    pytest.param({"name": "x"}, "dataset", id="missing-dataset"),
    pytest.param(tiny_spec(**{"tracking.tracking_uri": "sqlite:///elsewhere.db"}), "tracking.tracking_uri", id="foreign-mlflow"),
    pytest.param(tiny_spec(**{"scaling.num_workers": 8}), "scaling.num_workers", id="more-cpus-than-the-cluster"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "field"), BAD_BODIES)
def test_a_bad_spec_is_422_naming_the_field_and_nothing_is_stored_or_submitted(
    client: TestClient, spec: dict[str, Any], field: str
) -> None:
    rows, jobs = _row_count(client), _ray_job_ids(client)
    r = post_spec(client, spec)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == 422 and body["title"]
    assert field in [e["field"] for e in body["errors"]], body["errors"]
    assert _row_count(client) == rows
    assert _ray_job_ids(client) == jobs


def test_fault_injection_is_no_spec_option(client: TestClient) -> None:
    """Faults reach a training only through the tests' hooks: ``train.debug`` is an unknown key."""
    r = post_spec(client, tiny_spec(**{"train.debug.nonfinite_step": 3}))
    assert r.status_code == 422, r.text
    assert {"field": "train.debug", "message": "unknown key"}.items() <= r.json()["errors"][0].items()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"content": "{not json", "headers": {"Content-Type": "application/json"}}, "cannot parse"),
        ({"content": "[1, 2]", "headers": {"Content-Type": "application/json"}}, "mapping"),
        (_yaml("- a\n- b\n"), "mapping"),
        (_yaml("name: a\n---\nname: b\n"), "one spec per request"),
        (_yaml("a: &x [1]\nb: *x\n"), "aliases"),
        ({"content": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, "UTF-8"),
    ],
    ids=["bad-json", "json-list", "yaml-list", "two-documents", "yaml-alias", "not-utf8"],
)
def test_an_unparseable_body_is_422(client: TestClient, kwargs: dict[str, Any], message: str) -> None:
    kwargs["headers"] = {**auth(), **kwargs["headers"]}
    r = client.post("/v1/experiments", **kwargs)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert message in r.json()["errors"][0]["message"]


def test_a_yaml_spec_is_accepted_like_json(client: TestClient) -> None:
    import yaml

    r = client.post("/v1/experiments", **_yaml(yaml.safe_dump(tiny_spec("yaml-body"))))
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["train"]["epochs"] == 1
    assert client.post(f"/v1/experiments/{r.json()['id']}/cancel", headers=auth()).status_code == 202


def test_a_body_over_64_kib_is_413(client: TestClient) -> None:
    spec = tiny_spec(**{"name": "big"})
    spec["padding"] = "x" * MAX_BODY_BYTES
    r = post_spec(client, spec)
    assert r.status_code == 413
    assert r.headers["content-type"].startswith(PROBLEM)


def test_another_media_type_is_415(client: TestClient) -> None:
    r = client.post(
        "/v1/experiments", content=json.dumps(tiny_spec()), headers={"Content-Type": "text/plain", **auth()}
    )
    assert r.status_code == 415
    assert r.headers["content-type"].startswith(PROBLEM)
    assert "application/json" in r.json()["detail"]


def test_errors_of_the_framework_are_problem_json_too(client: TestClient) -> None:
    r = client.get("/v1/experiments", params={"limit": 0}, headers=auth())
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["errors"][0]["field"] == "limit"
    r = client.get("/v1/experiments/exp-0000000000000000", headers=auth())
    assert r.status_code == 404 and r.headers["content-type"].startswith(PROBLEM)
    r = client.get("/nowhere", headers=auth())
    assert r.status_code == 404 and r.headers["content-type"].startswith(PROBLEM)
    r = client.delete("/v1/experiments", headers=auth())
    assert r.status_code == 405 and r.headers["content-type"].startswith(PROBLEM)
