"""Trainings are scheduled by the resources they ask for, past one machine: a Ray cluster of a head
(no CPU) and two worker nodes on this machine (``ray.cluster_utils.Cluster``), each with 2 CPUs but
memory for one training (``scaling.memory_per_worker_gb``), runs a comparison of 2 arms x 2 seeds
through ``workers.run --address``, pooled and on Ray Train. The 4 trainings must all finish, spread over both nodes, never
more than 2 at once (the memory allows no more) and 2 at once at some point (as many as fit)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from hdet_run import TINY, run_spec
from mlflow import MlflowClient

GIB = 2**30
SPEC: dict[str, Any] = {
    **TINY,
    "name": "scheduled",
    "scaling": {
        "num_workers": 1,
        "use_gpu": False,
        "cpus_per_worker": 1,
        "memory_per_worker_gb": 1.0,
        "max_failures": 0,
    },  # fmt: skip
    "search": {"space": {}, "seeds": [0, 1], "baseline": True, "confirmatory": True},
    "tracking": {"experiment": "scheduled"},
}


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
    nodes = [c.add_node(num_cpus=2, memory=int(1.5 * GIB)) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, {n.node_id for n in nodes}
    finally:
        ray.shutdown()
        c.shutdown()


def _overlap(spans: list[tuple[int, int]]) -> int:
    """The most spans ``(start, end)`` open at one time."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.parametrize("trainer", ["auto", "ray_train"])
def test_a_comparisons_trainings_spread_over_the_nodes_as_many_at_once_as_fit(
    cluster: Any, tmp_path: Path, trainer: str
) -> None:
    c, worker_nodes = cluster
    spec = tmp_path / "scheduled.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "scaling": {**SPEC["scaling"], "trainer": trainer}}))
    done = run_spec(tmp_path, spec, "--address", c.address)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    from ray.util.state import list_actors, list_tasks

    ray.init(address=c.address, logging_level="ERROR")
    try:
        if trainer == "ray_train":
            workers = [a for a in list_actors(detail=True, limit=10_000) if "RayTrainWorker" in a.class_name]
        else:  # auto: one CPU worker, local storage: pooled tasks
            workers = [t for t in list_tasks(detail=True, limit=10_000) if t.name.startswith("hdet-train:")]
            assert all(t.state == "FINISHED" for t in workers), [(t.name, t.state) for t in workers]
    finally:
        ray.shutdown()
    assert len(workers) == 4, [(a.name, a.state) for a in workers]  # one per training, none retried
    assert {a.node_id for a in workers} == worker_nodes  # both nodes, never the head (it has no CPU)
    # When each training ran: on Ray Train its MLflow child run, opened beside its first steps,
    # closed at its end.
    c_ml = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c_ml.search_runs([c_ml.get_experiment_by_name("scheduled").experiment_id])
    children = [r for r in runs if r.data.tags.get("hdet.role") == "child"]
    assert sorted(r.data.tags["hdet.arm"] for r in children) == ["baseline"] * 2 + ["confirmatory"] * 2
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["hdet.trainer"] for r in children} == {
        "ray_train" if trainer == "ray_train" else "pooled"
    }
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    if trainer != "ray_train":
        # A pooled training's task runs from its start to its end (its child run opens once MLflow
        # is imported, which a reused process skips: the runs' spans are not the trainings').
        spans = [(t.start_time_ms, t.end_time_ms) for t in workers]
    assert _overlap(spans) == 2, spans  # one training per node's memory (CPUs would allow 4), both busy
