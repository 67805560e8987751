"""Hostile specs against a running API: a spec's paths are taken literally and must lie under the
service's data roots, ``runs:/`` references must name runs of its MLflow; a refusal is a 422 naming
the field, before anything is stored or submitted, and no answer carries an environment value,
a path resolved outside the roots or a file's content. Real Ray, MLflow and SQLite."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import NEVER, Stack, auth, post_spec, settings_for, tiny_spec, wait_for

from service.app import create_app

SECRET = "hostile-secret-value-0123456789abcdef"


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data-root")
    (root / "shapes").mkdir()
    (root / "escape").symlink_to("/etc")
    return root


@pytest.fixture(scope="module")
def client(stack: Stack, roots: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("paths") / "service.db"
    os.environ["HDET_TEST_SECRET"] = SECRET  # what an expanded $HDET_TEST_SECRET would reveal
    app = create_app(settings_for(stack, db, entrypoint_resources=NEVER, data_roots=str(roots)))
    try:
        with TestClient(app) as c:
            yield c
    finally:
        os.environ.pop("HDET_TEST_SECRET", None)


def _coco(root: str, **splits: Any) -> dict[str, Any]:
    spec = tiny_spec("hostile")
    spec["dataset"] = {"format": "coco", "root": root, "train": "train", "val": "val", **splits}
    return spec


def _state(client: TestClient) -> tuple[int, set[str]]:
    rows = client.get("/v1/experiments", params={"limit": 200}, headers=auth()).json()["items"]
    service = client.app.state.service  # type: ignore[attr-defined]
    return len(rows), {j.submission_id for j in service.jobs.list()}


def _refused(client: TestClient, spec: dict[str, Any], field: str, stack: Stack) -> str:
    before = _state(client)
    r = post_spec(client, spec)
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.text
    assert _state(client) == before  # nothing stored, nothing submitted
    secrets = [SECRET, stack.ray_token_path.read_text().strip(), os.environ["HOME"] + "/"]
    assert not [s for s in secrets if s in r.text], r.text
    assert "root:x:0:0" not in r.text  # /etc/passwd's content
    return r.text


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("dataset.root", lambda root: _coco("$HDET_TEST_SECRET")),
        ("dataset.root", lambda root: _coco("${HDET_TEST_SECRET}/coco")),
        ("dataset.root", lambda root: _coco("~/coco")),
        ("dataset.root", lambda root: _coco(f"{root}/../../etc")),
        ("dataset.root", lambda root: _coco("/etc")),
        ("dataset.root", lambda root: _coco(f"{root}/escape")),
        ("dataset.root", lambda root: _coco("../../../etc")),
        ("dataset.train", lambda root: _coco(f"{root}/shapes", train="../../etc")),
        ("dataset.val.images", lambda root: _coco(f"{root}/shapes", val={"images": "/etc", "ann": "a.json"})),
        (
            "dataset.val.ann",
            lambda root: _coco(f"{root}/shapes", val={"images": "v", "ann": "../../../x.json"}),
        ),
        ("detector.init_from", lambda root: tiny_spec("hostile", **{"detector.init_from": "/etc/passwd"})),
        ("detector.init_from", lambda root: tiny_spec("hostile", **{"detector.init_from": "~/.ssh/id_rsa"})),
        (
            "detector.pretrained_backbone",
            lambda root: tiny_spec("hostile", **{"detector.pretrained_backbone": "$HOME/w.pt"}),
        ),
        (
            "detector.init_from",
            lambda root: tiny_spec("hostile", **{"detector.init_from": "runs:/abc/../../.."}),
        ),
        (
            "detector.init_from",
            lambda root: tiny_spec(
                "hostile", **{"detector.init_from": "runs:/0123456789abcdef0123456789abcdef"}
            ),
        ),
    ],
)
def test_a_spec_path_outside_the_data_roots_is_refused_naming_the_field(
    client: TestClient, stack: Stack, roots: Path, field: str, make: Any
) -> None:
    _refused(client, make(roots), field, stack)


def test_a_pretraining_root_with_a_variable_is_refused(client: TestClient, stack: Stack) -> None:
    spec = tiny_spec("hostile", pretrain={"root": "${RAY_AUTH_TOKEN_PATH}", "images": 8, "val_images": 8})
    text = _refused(client, spec, "pretrain.root", stack)
    assert str(stack.ray_token_path) not in text


def test_paths_under_the_data_roots_are_stored_and_submitted_normalised(
    client: TestClient, roots: Path
) -> None:
    spec = _coco("shapes/./", val={"images": "v/../val", "ann": "annotations/val.json"})
    r = post_spec(client, spec)
    assert r.status_code == 202, r.text
    exp_id = r.json()["id"]
    service = client.app.state.service  # type: ignore[attr-defined]
    stored = json.loads(service.store.get(exp_id).spec)["dataset"]
    assert stored["root"] == str(roots / "shapes")
    assert stored["val"] == {
        "images": str(roots / "shapes" / "val"),
        "ann": str(roots / "shapes/annotations/val.json"),
    }
    wait_for(lambda: service.store.get(exp_id).status != "SUBMITTING", 60, "the submitter to send it")
    entrypoint = service.jobs._call("info", lambda c: c.get_job_info(exp_id)).entrypoint  # Ray's record
    assert json.dumps(str(roots / "shapes" / "val"))[1:-1] in entrypoint
    assert "shapes/./" not in entrypoint and "v/../val" not in entrypoint
    client.post(f"/v1/experiments/{exp_id}/cancel", headers=auth())


def test_serve_never_prints_the_whole_token_and_keeps_it_owner_only(stack: Stack) -> None:
    log = (stack.home / "serve.log").read_text()
    assert "API token" in log
    assert stack.token not in log
    assert len(stack.token) >= 32
    assert (stack.home / "api-token").stat().st_mode & 0o777 == 0o600
