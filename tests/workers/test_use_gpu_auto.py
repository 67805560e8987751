"""``scaling.use_gpu: auto`` resolves per training from the nodes the cluster has or can start: the node
types declared in ``HDET_CLUSTER_NODE_TYPES`` (one parser for the service and the driver), else the
nodes a real local Ray reports alive (with fake GPU and accelerator resources)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hdet_run import start_test_ray

from workers.resources import (
    NODE_TYPES_ENV,
    declared_node_types,
    parse_node_types,
    resolve_use_gpu,
    worker_bundle,
)
from workers.spec import Spec

A100 = {"CPU": 10, "GPU": 1, "accelerator_type:A100": 1, "memory": 52 * 2**30}


def _spec(**scaling: Any) -> Spec:
    return Spec.parse({"name": "auto", "dataset": {"format": "synthetic"}, "scaling": scaling})


# --------------------------------------------------------------------------- the declared node types


def test_node_types_are_parsed_from_json_text_or_a_list() -> None:
    text = json.dumps([{"CPU": 2}, A100])
    assert parse_node_types(text) == [{"CPU": 2.0}, {k: float(v) for k, v in A100.items()}]
    assert parse_node_types([{"CPU": 2}]) == [{"CPU": 2.0}]
    assert parse_node_types("[]") == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("CPU: 8", "HDET_CLUSTER_NODE_TYPES: not JSON"),
        ('{"CPU": 8}', "expected a JSON list of node types, got dict"),
        ('[{"CPU": 8}, 4]', "HDET_CLUSTER_NODE_TYPES[1]: expected an object of resource amounts"),
        ("[{}]", "HDET_CLUSTER_NODE_TYPES[0]: expected an object"),
        ('[{"CPU": -1}]', "'CPU': -1 is not a non-negative amount"),
        ('[{"GPU": "one"}]', "'GPU': 'one' is not a non-negative amount"),
        ('[{"GPU": true}]', "'GPU': True is not a non-negative amount"),
    ],
)
def test_bad_node_types_are_refused_naming_the_variable_and_the_entry(text: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_node_types(text)
    assert words in str(info.value)


def test_the_variable_unset_or_blank_declares_nothing() -> None:
    assert declared_node_types({}) is None
    assert declared_node_types({NODE_TYPES_ENV: "  "}) is None
    assert declared_node_types({NODE_TYPES_ENV: '[{"CPU": 4}]'}) == [{"CPU": 4.0}]


def test_the_service_reads_the_variable_with_the_same_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv(NODE_TYPES_ENV, json.dumps([A100]))
    assert Settings().cluster_node_types == declared_node_types()
    monkeypatch.setenv(NODE_TYPES_ENV, '[{"CPU": -1}]')
    with pytest.raises(ValidationError, match=r"HDET_CLUSTER_NODE_TYPES\[0\]: 'CPU': -1"):
        Settings()


@pytest.mark.parametrize(
    ("scaling", "declared", "use_gpu"),
    [
        ({}, [{"CPU": 4}], False),
        ({}, [{"CPU": 4}, A100], True),  # a GPU group at zero replicas still counts
        ({"gpus_per_worker": 0.25}, [A100], True),
        ({"gpus_per_worker": 2}, [A100], False),  # no node type holds a worker with 2 GPUs
        ({"cpus_per_worker": 16}, [A100], False),
        ({"accelerator_type": "A100"}, [A100], True),
        ({"accelerator_type": "H100"}, [A100], False),
        ({"memory_per_worker_gb": 64}, [A100], False),
        ({"use_gpu": False}, [A100], False),
        ({"use_gpu": True}, [{"CPU": 4}], True),  # asked for: not decided by the nodes
    ],
)
def test_auto_resolves_from_the_declared_node_types_without_ray(
    monkeypatch: pytest.MonkeyPatch, scaling: dict[str, Any], declared: list[dict[str, Any]], use_gpu: bool
) -> None:
    import ray

    assert not ray.is_initialized()
    monkeypatch.setenv(NODE_TYPES_ENV, json.dumps(declared))
    assert resolve_use_gpu(_spec(**scaling)) is use_gpu


def test_auto_without_ray_or_declared_nodes_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NODE_TYPES_ENV, raising=False)
    assert resolve_use_gpu(_spec()) is False


def test_a_bad_declaration_fails_the_resolution_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NODE_TYPES_ENV, "GPU")
    with pytest.raises(ValueError, match="HDET_CLUSTER_NODE_TYPES: not JSON"):
        resolve_use_gpu(_spec())


def test_the_bundle_carries_the_accelerator_marker() -> None:
    bundle = worker_bundle(_spec(accelerator_type="A100", gpus_per_worker=0.5), use_gpu=True)
    assert bundle == {"CPU": 1.0, "GPU": 0.5, "accelerator_type:A100": 0.001}
    assert worker_bundle(_spec(), use_gpu=False) == {"CPU": 1.0}


# --------------------------------------------------------------------------- on a real local Ray


@pytest.fixture(scope="module")
def fake_gpu_ray() -> Iterator[None]:
    """A local Ray whose one node declares a GPU and an A100 marker (fake: nothing uses them here)."""
    import ray

    start_test_ray(2, num_gpus=1, resources={"accelerator_type:A100": 1})
    yield
    ray.shutdown()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("scaling", "use_gpu"),
    [
        ({}, True),
        ({"gpus_per_worker": 0.5}, True),
        ({"gpus_per_worker": 2}, False),
        ({"cpus_per_worker": 4}, False),
        ({"accelerator_type": "A100"}, True),
        ({"accelerator_type": "H100"}, False),
    ],
)
def test_auto_resolves_from_the_nodes_ray_reports_alive(
    fake_gpu_ray: None, monkeypatch: pytest.MonkeyPatch, scaling: dict[str, Any], use_gpu: bool
) -> None:
    monkeypatch.delenv(NODE_TYPES_ENV, raising=False)
    assert resolve_use_gpu(_spec(**scaling)) is use_gpu


@pytest.mark.integration
def test_declared_node_types_win_over_the_nodes_alive(
    fake_gpu_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NODE_TYPES_ENV, json.dumps([{"CPU": 8}]))
    assert resolve_use_gpu(_spec()) is False
    monkeypatch.setenv(NODE_TYPES_ENV, json.dumps([{"CPU": 8}, {"CPU": 8, "GPU": 4}]))
    assert resolve_use_gpu(_spec(gpus_per_worker=2)) is True


@pytest.mark.integration
def test_each_trainer_reserves_what_auto_resolved_to_when_it_is_built(
    fake_gpu_ray: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from workers.tracking import TrackingContext
    from workers.training.trainer import make_trainer

    ctx = TrackingContext(f"sqlite:///{tmp_path / 'm.db'}", "e", "0", "")
    spec = _spec(gpus_per_worker=0.5)

    def built() -> Any:
        t = make_trainer(spec, run_name="r", storage_path=str(tmp_path), tracking=ctx, defer_run=True)
        return t.scaling_config

    monkeypatch.setenv(NODE_TYPES_ENV, json.dumps([{"CPU": 8}]))
    cpu = built()
    assert cpu.use_gpu is False and "GPU" not in cpu.resources_per_worker
    monkeypatch.delenv(NODE_TYPES_ENV)
    gpu = built()
    assert gpu.use_gpu is True and gpu.resources_per_worker["GPU"] == 0.5
