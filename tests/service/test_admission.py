"""Admission by resources: a spec whose workers no node can hold (or, on a fixed cluster, more
workers than the nodes hold together) is a 422 naming the field and what the cluster has, before
anything is stored. The nodes are those the session's real Ray reports (4 CPUs, no GPU), or the
node types declared for an autoscaling cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import NEVER, Stack, auth, post_spec, settings_for, tiny_spec

from service.admission import admission_problems
from service.app import create_app
from workers.spec import Spec

A100 = {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 1.0}


def _spec(**scaling: Any) -> Spec:
    return Spec.parse(
        tiny_spec("admit", **{f"scaling.{k}": v for k, v in scaling.items()}), check_paths=False
    )


@pytest.mark.parametrize(
    ("scaling", "nodes", "autoscaling", "field"),
    [
        ({}, [{"CPU": 4.0}], False, None),
        ({"use_gpu": True}, [{"CPU": 4.0}], False, "scaling.use_gpu"),
        ({"use_gpu": True, "gpus_per_worker": 2}, [A100], True, "scaling.gpus_per_worker"),
        ({"cpus_per_worker": 16}, [A100, {"CPU": 4.0}], True, "scaling.cpus_per_worker"),
        ({"accelerator_type": "H100", "use_gpu": True}, [A100], True, "scaling.accelerator_type"),
        ({"accelerator_type": "A100", "use_gpu": True}, [A100], True, None),
        ({"num_workers": 3, "cpus_per_worker": 2}, [{"CPU": 4.0}], False, "scaling.num_workers"),
        ({"num_workers": 3, "cpus_per_worker": 2}, [{"CPU": 4.0}, {"CPU": 2.0}], False, None),
        ({"num_workers": 3, "cpus_per_worker": 2}, [{"CPU": 4.0}], True, None),  # more nodes can start
        ({"use_gpu": "auto"}, [{"CPU": 1.0}], False, None),
        ({}, [{"CPU": 0.0}], False, "scaling.cpus_per_worker"),  # a head that trains nothing
    ],
)
def test_a_worker_must_fit_one_node_and_a_fixed_cluster_all_workers(
    scaling: dict[str, Any], nodes: list[dict[str, float]], autoscaling: bool, field: str | None
) -> None:
    problems = admission_problems(_spec(**scaling), nodes, autoscaling=autoscaling)
    assert [p[0] for p in problems] == ([field] if field else [])


@pytest.fixture(scope="module")
def client(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("admission") / "service.db"
    with TestClient(create_app(settings_for(stack, db, entrypoint_resources=NEVER))) as c:
        yield c


def _count(client: TestClient) -> int:
    return len(client.get("/v1/experiments", headers=auth()).json()["items"])


def test_a_spec_asking_for_a_gpu_the_cluster_lacks_is_422_naming_what_it_has(client: TestClient) -> None:
    before = _count(client)
    r = post_spec(client, tiny_spec("admit", **{"scaling.use_gpu": True}))
    assert r.status_code == 422, r.text
    (err,) = r.json()["errors"]
    assert err["field"] == "scaling.use_gpu"
    assert "4 CPU, 0 GPU" in err["message"]  # what the session's Ray reports
    r = post_spec(client, tiny_spec("admit", **{"scaling.num_workers": 5}))
    assert [e["field"] for e in r.json()["errors"]] == ["scaling.num_workers"]
    assert _count(client) == before


def test_declared_node_types_of_an_autoscaling_cluster_admit_what_they_can_hold(
    stack: Stack, tmp_path: Path
) -> None:
    settings = settings_for(stack, tmp_path / "db", entrypoint_resources=NEVER, cluster_node_types=[A100])
    with TestClient(create_app(settings)) as c:
        r = post_spec(c, tiny_spec("admit", **{"scaling.use_gpu": True, "scaling.accelerator_type": "H100"}))
        assert [e["field"] for e in r.json()["errors"]] == ["scaling.accelerator_type"], r.text
        r = post_spec(c, tiny_spec("admit", **{"scaling.use_gpu": True, "scaling.accelerator_type": "A100"}))
        assert r.status_code == 202, r.text
        c.post(f"/v1/experiments/{r.json()['id']}/cancel", headers=auth())


def test_memory_per_worker_is_admitted_against_the_nodes_memory() -> None:
    node = {"CPU": 8.0, "memory": 8.0 * 2**30}
    too_big = admission_problems(_spec(memory_per_worker_gb=16), [node], autoscaling=False)
    assert [p[0] for p in too_big] == ["scaling.memory_per_worker_gb"] and "8.0 GiB memory" in too_big[0][1]
    three = _spec(memory_per_worker_gb=3, num_workers=3)
    assert [p[0] for p in admission_problems(three, [node], autoscaling=False)] == ["scaling.num_workers"]
    assert admission_problems(three, [node, node], autoscaling=False) == []
