"""Whether a spec's trainings can ever be scheduled, decided before it is stored.

A training is ``scaling.num_workers`` Ray Train workers, each needing its CPUs, its GPUs (with
``use_gpu: true``) and the accelerator type's marker resource on one node
(:func:`workers.resources.worker_bundle`). The nodes are those Ray reports alive, or, for an
autoscaling cluster, the node types the deployment declares (``HDET_CLUSTER_NODE_TYPES``, the largest
each group can start, parsed by :func:`workers.resources.parse_node_types` as the driver parses it):
a worker no node can hold, or more workers than the reported nodes hold together, would wait
forever; the spec is refused naming the field and what the cluster has.
"""

from __future__ import annotations

from workers.resources import ACCELERATOR_PREFIX, worker_bundle, workers_held
from workers.spec import Spec

__all__ = ["admission_problems", "describe"]

_FIELDS = {
    "CPU": "scaling.cpus_per_worker",
    "GPU": "scaling.gpus_per_worker",
    "memory": "scaling.memory_per_worker_gb",
}


def describe(resources: dict[str, float]) -> str:
    """``8 CPU, 1 GPU, accelerator A100`` (memory and Ray's own markers left out)."""
    parts = [f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU")]
    if "memory" in resources:
        parts.append(f"{resources['memory'] / 2**30:.1f} GiB memory")
    parts += [
        f"accelerator {k.removeprefix(ACCELERATOR_PREFIX)}"
        for k in resources
        if k.startswith(ACCELERATOR_PREFIX)
    ]
    return ", ".join(parts)


def admission_problems(
    spec: Spec, nodes: list[dict[str, float]], *, autoscaling: bool
) -> list[tuple[str, str]]:
    """Why ``spec``'s trainings could never start on ``nodes`` (empty when they can)."""
    # auto may always fall back to the CPU: only use_gpu: true needs a GPU to be admitted
    bundle = worker_bundle(spec, use_gpu=spec.scaling.use_gpu is True)
    where = "the cluster can start" if autoscaling else "the cluster has"
    kinds = "; ".join(sorted({describe(n) for n in nodes})) or "no node"
    if not any(workers_held(n, bundle) for n in nodes):
        lacking = [k for k, v in bundle.items() if not any(n.get(k, 0.0) >= v for n in nodes)]
        field = next(
            (
                _FIELDS.get(k, "scaling.accelerator_type" if k.startswith(ACCELERATOR_PREFIX) else "scaling")
                for k in lacking
            ),
            "scaling",
        )
        if field == "scaling.gpus_per_worker" and not any(n.get("GPU", 0.0) > 0 for n in nodes):
            field = "scaling.use_gpu"
        return [(field, f"a worker needs {describe(bundle)} on one node; the nodes {where}: {kinds}")]
    held = sum(workers_held(n, bundle) for n in nodes)
    workers = spec.scaling.num_workers
    if not autoscaling and held < workers:
        return [
            (
                "scaling.num_workers",
                f"a training needs {workers} workers of {describe(bundle)}; the nodes {where} hold "
                f"{held} ({kinds})",
            )
        ]
    return []
