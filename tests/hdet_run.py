"""What the end-to-end tests of `hdet run` share: the tiniest spec that trains (RetinaNet at 48 px on
8 generated images, 1 epoch), `python -m workers.run` in a subprocess with its own HDET_HOME,
sqlite MLflow store and Ray storage, and a test module's own local Ray in the test process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "dataset": {"format": "synthetic", "train": 8, "val": 4, "test": 4, "image_size": 48, "seed": 0},
    "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 48},
    "loss": {"kind": "harmonicdet"},
    "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup": {"iters": 1, "factor": 0.5}},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5, "max_failures": 0},
}


def _command(home: Path, spec: Path, args: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "HDET_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "workers.run", str(spec), "--tracking-uri", f"sqlite:///{home / 'mlflow.db'}",
           "--storage-path", str(home / "storage"), *args]  # fmt: skip
    return cmd, env


def run_spec(home: Path, spec: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m workers.run SPEC ARGS`` with ``home`` as HDET_HOME, its MLflow store and storage."""
    cmd, env = _command(home, spec, args)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def start_spec(home: Path, spec: Path, *args: str, log: Path | None = None) -> subprocess.Popen[str]:
    """:func:`run_spec` started in the background: its output goes to ``log``, else to a pipe."""
    cmd, env = _command(home, spec, args)
    out: Any = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def tiny_spec_data(name: str, root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """:data:`TINY` as a spec named ``name``, its data under ``root``, each of ``sections`` merged
    into the section of that name (``search`` and others TINY lacks: set)."""
    data: dict[str, Any] = {k: dict(v) for k, v in TINY.items()}
    data["dataset"]["root"] = str(root / "data")
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return {"name": name, "tracking": {"experiment": name}, **data}


def tiny_spec(name: str, root: Path, **sections: dict[str, Any]) -> Any:
    """:func:`tiny_spec_data`, parsed."""
    from workers.spec import Spec

    return Spec.parse(tiny_spec_data(name, root, **sections))


def start_test_ray(num_cpus: int, **resources: Any) -> None:
    """A new local Ray in this process with ``num_cpus`` and ``resources`` (``num_gpus``, custom
    ``resources``): never one already running on this machine, no dashboard."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
        **resources,
    )
