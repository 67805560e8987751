"""What one training worker asks Ray for, and the nodes a cluster has or can start.

A worker's bundle is its CPUs, its GPUs (with ``use_gpu``), Ray's ``memory`` resource (with
``scaling.memory_per_worker_gb``) and the marker resource of ``scaling.accelerator_type``. The nodes
are the node types declared in ``HDET_CLUSTER_NODE_TYPES`` (a JSON list of Ray resource dicts, the
largest node each group of an autoscaling cluster can start, e.g. ``[{"CPU": 10, "GPU": 1,
"accelerator_type:A100": 1}]``), else the nodes Ray reports alive. The REST service admits specs
against them and the driver resolves ``scaling.use_gpu: auto`` with them, so both read the variable
with :func:`parse_node_types`.

Ray 2.60 publishes its autoscaler's node types only through a private module
(``ray._private.state``), so they are not read: an autoscaling cluster whose GPU groups start at
zero declares them.

Nothing here imports Ray at module level: the service and the spec's consumers import it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.spec import Spec

__all__ = [
    "ACCELERATOR_PREFIX",
    "NODE_TYPES_ENV",
    "alive_nodes",
    "cluster_nodes",
    "declared_node_types",
    "parse_node_types",
    "resolve_use_gpu",
    "worker_bundle",
    "worker_resources",
    "workers_held",
]

#: The node types an autoscaling cluster can start (JSON), read by the service and the driver.
NODE_TYPES_ENV = "HDET_CLUSTER_NODE_TYPES"
#: Ray's marker resource of a node's accelerator type (``accelerator_type:A100``).
ACCELERATOR_PREFIX = "accelerator_type:"
#: What a worker asking for an accelerator type reserves of its marker, as Ray Train does.
ACCELERATOR_MARKER = 0.001


def parse_node_types(value: str | list[Any], source: str = NODE_TYPES_ENV) -> list[dict[str, float]]:
    """The node types of ``value``: JSON text, or the list it decodes to.

    Each node type is an object of Ray resource names (``CPU``, ``GPU``, ``memory`` in bytes,
    ``accelerator_type:<TYPE>``, custom resources) to non-negative amounts.

    Raises:
        ValueError: not JSON, not a list of such objects; the message names ``source`` and the entry.
    """
    data: Any = value
    if isinstance(value, str):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f'{source}: not JSON ({e}); expected e.g. [{{"CPU": 8, "GPU": 1}}]') from None
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of node types, got {type(data).__name__}")
    nodes: list[dict[str, float]] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping) or not entry:
            raise ValueError(f"{source}[{i}]: expected an object of resource amounts, got {entry!r}")
        node: dict[str, float] = {}
        for name, amount in entry.items():
            ok = isinstance(amount, int | float) and not isinstance(amount, bool)
            if not isinstance(name, str) or not ok or not math.isfinite(amount) or amount < 0:
                raise ValueError(
                    f"{source}[{i}]: {name!r}: {amount!r} is not a non-negative amount of a resource"
                )
            node[name] = float(amount)
        nodes.append(node)
    return nodes


def declared_node_types(environ: Mapping[str, str] | None = None) -> list[dict[str, float]] | None:
    """``HDET_CLUSTER_NODE_TYPES`` parsed (:func:`parse_node_types`); None when it is unset or blank."""
    text = (os.environ if environ is None else environ).get(NODE_TYPES_ENV, "")
    return parse_node_types(text) if text.strip() else None


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each node the connected Ray reports alive (none without a connection)."""
    import ray

    if not ray.is_initialized():
        return []
    return [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]


def cluster_nodes() -> tuple[list[dict[str, float]], bool]:
    """The nodes a training can land on, and whether they are declared node types (True) rather than
    the nodes alive now."""
    declared = declared_node_types()
    if declared is not None:
        return declared, True
    return alive_nodes(), False


def worker_resources(spec: Spec, use_gpu: bool) -> dict[str, float]:
    """What each Ray Train worker of ``spec`` reserves: its CPUs, its GPUs (with ``use_gpu``) and,
    with ``scaling.memory_per_worker_gb``, Ray's ``memory`` resource in bytes."""
    s = spec.scaling
    resources: dict[str, float] = {"CPU": float(s.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(s.gpus_per_worker)
    if s.memory_per_worker_gb is not None:
        resources["memory"] = float(round(s.memory_per_worker_gb * 2**30))
    return resources


def worker_bundle(spec: Spec, use_gpu: bool) -> dict[str, float]:
    """:func:`worker_resources` and the accelerator type's marker: what Ray places for one worker."""
    bundle = worker_resources(spec, use_gpu)
    if spec.scaling.accelerator_type:
        bundle[ACCELERATOR_PREFIX + spec.scaling.accelerator_type] = ACCELERATOR_MARKER
    return bundle


def workers_held(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many workers of ``bundle`` the node holds."""
    return min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0)


def resolve_use_gpu(spec: Spec) -> bool:
    """``scaling.use_gpu``; ``auto`` means: a node the cluster has or can start holds a worker with
    its GPUs (``gpus_per_worker``, and the CPUs, memory and accelerator type it asks for).

    The nodes are :func:`cluster_nodes`: the declared node types of an autoscaling cluster, else the
    nodes Ray reports alive (none when this process is not connected to Ray: CPU).

    Raises:
        ValueError: ``HDET_CLUSTER_NODE_TYPES`` is set but not valid (:func:`parse_node_types`).
    """
    if spec.scaling.use_gpu != "auto":
        return bool(spec.scaling.use_gpu)
    nodes, _ = cluster_nodes()
    bundle = worker_bundle(spec, use_gpu=True)
    return any(workers_held(n, bundle) > 0 for n in nodes)
