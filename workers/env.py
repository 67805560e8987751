"""Local defaults of a HarmonicDet installation, a description of the machine a run uses, and the
local Ray's start and shutdown (nothing of it outlives its shutdown).

Everything a local run writes lives under one data directory, ``$HDET_HOME`` (default
``./.hdet`` under the current directory): generated datasets, the MLflow sqlite store and
artifacts, and Ray's run storage. A deployed run overrides each piece (``--tracking-uri``,
``RAY_ADDRESS``, the dataset's ``root``) and never needs this directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any


def hdet_home() -> Path:
    """The data directory: ``$HDET_HOME``, else ``./.hdet`` under the current directory (absolute)."""
    return Path(os.environ.get("HDET_HOME") or Path.cwd() / ".hdet").expanduser().resolve()


def data_dir() -> Path:
    """Where generated datasets go."""
    return hdet_home() / "data"


def storage_dir() -> Path:
    """Ray Train / Tune storage (checkpoints, run state) of local runs."""
    return hdet_home() / "ray_results"


def mlflow_dir() -> Path:
    return hdet_home() / "mlflow"


def default_tracking_uri() -> str:
    """The local MLflow store: a sqlite database under the data directory.

    mlflow 3 refuses the old ``./mlruns`` file store, so the local default is a database.
    """
    return f"sqlite:///{mlflow_dir() / 'mlflow.db'}"


GIT_COMMIT_ENV = "HDET_GIT_COMMIT"


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the source tree this package runs from, or ``unknown`` outside a checkout.

    ``HDET_GIT_COMMIT`` wins when set: the local Ray sets it for its worker processes, which would
    otherwise each run git once.
    """
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version() -> str:
    import harmonic

    return harmonic.__version__


def environment(device: str | None = None) -> dict[str, Any]:
    """What a run needs written down to be reproduced: versions, commit, host, device."""
    import torch
    import torchvision

    env: dict[str, Any] = {
        "harmonicdet": package_version(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    try:
        import mlflow

        env["mlflow"] = mlflow.__version__
    except ImportError:  # pragma: no cover
        pass
    if device is not None:
        env["device"] = device
        if device.startswith("cuda") and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


# Marks a local Ray started without its dashboard (and so without the state API).
NO_STATE_API_ENV = "HDET_RAY_NO_STATE_API"

# How often (ms) a Ray node's agent gathers and publishes the node's statistics for the dashboard.
REPORTER_INTERVAL_ENV = "REPORTER_UPDATE_INTERVAL_MS"

# Marks a one-machine Ray: no autoscaler, so no Train run asks for resources through Ray's
# autoscaling coordinator (see workers.controller_hooks.FixedScalingWithoutAutoscaler).
NO_AUTOSCALER_ENV = "HDET_RAY_NO_AUTOSCALER"


def ray_has_no_autoscaler() -> bool:
    """True in the processes of a one-machine Ray started by this package (``LOCAL_RAY_ENV``)."""
    return os.environ.get(NO_AUTOSCALER_ENV) == "1"


#: Ray Train settings for short trials, applied with ``setdefault`` (a value set by the user wins).
#: Ray propagates them to the Train controller and workers; a local Ray has them from its start.
TRAIN_ENV_DEFAULTS = {
    # The controller polls its workers (and so notices a started group or a report) at this
    # interval; 2 s by default, i.e. up to 2 s lost at start and per epoch.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Trainers of concurrent trials may wait for each other's resources; the default 60 s would
    # fail a trainer that waits behind a long epoch.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3600",
}


#: Settings of a one-machine Ray (``hdet run``'s local one, ``hdet serve``'s head), set before it
#: starts so that every process of it has them (a value set by the user wins).
LOCAL_RAY_ENV = {
    **TRAIN_ENV_DEFAULTS,
    # Ray Train's preemption watcher (one more actor process per training run) follows node
    # drains on a cluster; a one-machine Ray has no node to drain.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Nor an autoscaler: Ray Train's autoscaling coordinator (one more actor process, waking 100
    # times a second beside the training) would forward resource requests to nobody.
    NO_AUTOSCALER_ENV: "1",
    # Ray's log monitor (it streams the workers' output to the driver) lists the log folder 10
    # times a second unless there are over this many files; at 0 it lists it every 0.5 s (new
    # workers' logs are found up to 0.4 s later) and uses half the CPU beside the training.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    # Trainings beyond the CPUs wait for others to end (hdet run sizes a local Ray to the cores):
    # only they free resources here, so a wait is no sign of a misconfigured cluster.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(7 * 24 * 3600),
}


def init_local_ray(num_cpus: int | None = None, num_gpus: int | None = None, dashboard: bool = False) -> None:
    """Join ``RAY_ADDRESS`` if set, else start a local Ray bound to 127.0.0.1.

    The dashboard is off unless asked: it costs a few seconds and a few hundred MB on a small
    machine, and a one-off local run does not need the Jobs API.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    if not dashboard:
        # Set before the local Ray starts so that its worker processes (Tune trials, Train
        # controllers) inherit it: they cannot tell on their own that no state API is served.
        os.environ[NO_STATE_API_ENV] = "1"
        # Nor a dashboard to show the node's statistics, which Ray's agent gathers every 5 s.
        os.environ.setdefault(REPORTER_INTERVAL_ENV, "60000")
    os.environ.setdefault(GIT_COMMIT_ENV, git_commit())
    # Set before the local Ray starts, every process of it has these (a single run's too).
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    adopt_orphans()
    ray.init(
        address="local",  # a new Ray even when another runs on this machine (`ray start`, a test cluster)
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=dashboard,
        _node_ip_address="127.0.0.1",
        configure_logging=True,
        logging_level=logging.WARNING,
    )


# prctl(2): the caller becomes the "subreaper" of its descendants.
_PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Make this process the subreaper of its descendants (Linux): a process whose parent ends
    first, such as a Ray worker whose raylet was stopped before it, becomes this process's child
    instead of init's, so that :func:`end_orphans` finds it. False where the kernel refuses."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    return bool(ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _ray_process(pid: int) -> bool:
    """The process runs for a Ray: the raylet gives every worker (and what a worker starts) its pid."""
    from workers.cpu_share import environment

    return "RAY_RAYLET_PID" in (environment(pid) or {})


def end_orphans(grace_s: float = 5.0) -> list[str]:
    """End this process's children that run for a Ray (:func:`_ray_process`) and so outlived its
    shutdown: SIGTERM, SIGKILL after ``grace_s``, then reaped. Returns them as ``command (pid)``.

    After ``ray.shutdown()`` a worker that missed its raylet's end can stay, with its memory and a
    little CPU (seen: a Train controller after an interrupted search, still there 13 min later);
    :func:`adopt_orphans` made it this process's child. Other children are not touched."""
    import signal
    import time

    from workers.cpu_share import command_line, proc_stats

    me = os.getpid()
    left = {
        pid: command_line(pid)
        for pid, fields in proc_stats().items()
        if int(fields[1]) == me and fields[0] != "Z" and _ray_process(pid)
    }
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    waiting, deadline = set(left), time.monotonic() + grace_s
    while waiting:
        for pid in list(waiting):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            waiting.discard(pid)
        if waiting and time.monotonic() >= deadline:
            for pid in waiting:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            break
        if waiting:
            time.sleep(0.05)
    return [f"{command} (pid {pid})" for pid, command in left.items()]


def shutdown_local_ray(who: str) -> None:
    """``ray.shutdown()`` of a Ray this process started, then :func:`end_orphans`, saying on stderr
    what it ended (``who``: the command, for the message)."""
    import ray

    ray.shutdown()
    ended = end_orphans()
    if ended:
        print(
            f"{who}: ended {len(ended)} process(es) the local Ray left running: {', '.join(ended)}",
            file=sys.stderr,
        )
