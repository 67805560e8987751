"""Local defaults of a HarmonicDet installation, a description of the machine a run uses, and
what a local Ray is on this project (:class:`LocalRay`): its CPUs, temp dir, token and settings,
whether ``hdet run`` starts it in its own process or ``hdet serve`` as a Ray head; its start in
process and its shutdown (nothing of it outlives its shutdown).

Everything a local run writes lives under one data directory, ``$HDET_HOME`` (default
``./.hdet`` under the current directory): generated datasets, the MLflow sqlite store and
artifacts, Ray's run storage and the local Ray's temp dir. A deployed run overrides each piece
(``--tracking-uri``, ``RAY_ADDRESS``, the dataset's ``root``) and never needs this directory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
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
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
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
# autoscaling coordinator (see workers.training.controller_hooks.FixedScalingWithoutAutoscaler).
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
    # Trainings beyond the CPUs wait for others to end (a local Ray has the cores, local_ray_cpus):
    # only they free resources here, so a wait is no sign of a misconfigured cluster.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(7 * 24 * 3600),
    # A pooled training's process (workers.training.pooled) waits idle, torch imported, for the
    # next one. Ray kills idle workers after 1 s once it has more processes than CPUs (the trials
    # and helper actors count): keep them for a minute, the gap between trainings or rounds.
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
}


#: The address every process of a local Ray binds: it serves this machine only.
LOCAL_RAY_IP = "127.0.0.1"

#: Logical CPUs a local Ray has beyond the cores its trainings use, for what reserves a share of a
#: CPU without working on it: the Tune trials (``workers.search.TRIAL_CPUS``, 0.01 each). Ray counts
#: a node's CPUs in whole units, so the room is one CPU (100 trials at once).
RESERVATION_ROOM_CPUS = 1.0

# Ray's sockets lie under ``<temp dir>/session_<date>_<pid>/sockets/``, which must stay within the
# 107-byte limit of a socket path: a temp dir longer than this is made under /tmp instead.
_MAX_RAY_TEMP_DIR = 40

# Ray's variables that would make a process join a running cluster or carry its credentials.
_CLUSTER_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")


def local_ray_cpus(cores: float | None = None, *, reserved: float, least: float = 0.0) -> int:
    """Logical CPUs of a local Ray: ``cores`` (default: this machine's) for the trainings, each of
    which reserves its ``num_workers x cpus_per_worker`` and beyond them waits its turn, plus
    ``reserved`` for what asks for a share of a CPU without using it (the Tune trials), rounded up
    to whole CPUs; at least ``least`` (one training), so that a small machine runs it
    oversubscribed rather than never. A job's entrypoint reserves no CPU (Ray Jobs' default).

    Raises:
        ValueError: ``cores`` is negative.
    """
    if cores is None:
        cores = float(os.cpu_count() or 1)
    if cores < 0:
        raise ValueError(f"num_cpus: {cores:g} is negative; give the cores the trainings may use")
    return math.ceil(max(cores + reserved, least) - 1e-9)


def cpus_argument(text: str) -> float:
    """``--num-cpus N`` of ``hdet run`` and ``hdet serve``: the cores the trainings may use."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CPUs") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of CPUs")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give the cores the trainings may use")
    return value


def write_secret(path: Path, value: str | None = None) -> str:
    """Write (or read back) a secret file of mode 0600; a new random value if absent."""
    import secrets

    if path.is_file() and value is None:
        return path.read_text().strip()
    value = value or secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.chmod(path, 0o600)
    return value


@dataclass(frozen=True)
class LocalRay:
    """A one-machine Ray of this project, whichever command starts it: ``hdet run`` in its own
    process (:func:`start_local_ray`), ``hdet serve`` as ``ray start --head`` (``service.stack``).

    Both take from here their CPUs (:func:`local_ray_cpus`), GPUs (``None``: those Ray finds),
    address (a new Ray on :data:`LOCAL_RAY_IP`, never one that runs already), temp dir
    (``$HDET_HOME/ray``) and the environment of every process of it (:meth:`apply`). Build one with
    :meth:`create`.
    """

    num_cpus: int
    temp_dir: Path
    #: The dashboard, and with it the Jobs API and the state API.
    dashboard: bool = False
    num_gpus: int | None = None
    #: Ray's token auth with the token in this file (mode 0600): a Ray whose Jobs API other
    #: processes use. ``None``: Ray's own default.
    token_path: Path | None = None
    #: The temp dir was made for this Ray (its usual place was too long): :meth:`cleanup` removes it.
    own_temp_dir: bool = False

    @classmethod
    def create(
        cls,
        num_cpus: int,
        *,
        home: Path | None = None,
        dashboard: bool = False,
        num_gpus: int | None = None,
        token: bool = False,
    ) -> LocalRay:
        """The local Ray of data directory ``home`` (default :func:`hdet_home`); ``token``: with
        token auth, the token read from (or generated into) ``home/ray-auth-token``."""
        import tempfile

        home = home or hdet_home()
        temp_dir, own = home / "ray", False
        if len(str(temp_dir)) > _MAX_RAY_TEMP_DIR:
            temp_dir, own = Path(tempfile.mkdtemp(prefix="hdet-ray-")), True
        token_path = home / "ray-auth-token" if token else None
        if token_path is not None:
            write_secret(token_path)
        return cls(num_cpus, temp_dir, dashboard, num_gpus, token_path, own)

    def apply(self, environ: MutableMapping[str, str]) -> None:
        """Set in ``environ``, before the Ray starts, what every process of it reads: the settings
        of :data:`LOCAL_RAY_ENV` and the source commit (a value already there wins), the marks of a
        Ray without dashboard, the token's place; and drop what would join another cluster."""
        for name in _CLUSTER_ENV:
            environ.pop(name, None)
        environ.setdefault(GIT_COMMIT_ENV, git_commit())
        for k, v in LOCAL_RAY_ENV.items():
            environ.setdefault(k, v)
        if self.dashboard:
            environ.pop(NO_STATE_API_ENV, None)
        else:
            # Its processes (Tune trials, Train controllers) cannot tell on their own that no state
            # API is served; nor a dashboard to show the node's statistics Ray's agent gathers every 5 s.
            environ[NO_STATE_API_ENV] = "1"
            environ.setdefault(REPORTER_INTERVAL_ENV, "60000")
        if self.token_path is not None:
            environ["RAY_AUTH_MODE"] = "token"
            environ["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)

    def init_kwargs(self) -> dict[str, Any]:
        """``ray.init`` keywords that start it in this process."""
        return {
            "address": "local",  # a new Ray even when another runs on this machine
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "include_dashboard": self.dashboard,
            "_node_ip_address": LOCAL_RAY_IP,
            "_temp_dir": str(self.temp_dir),
            "configure_logging": True,
            "logging_level": logging.WARNING,
        }

    def start_args(self) -> list[str]:
        """``ray start --head`` options that start it as a process of its own (its ports aside)."""
        args = ["--node-ip-address", LOCAL_RAY_IP, "--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            args += ["--num-gpus", str(self.num_gpus)]
        args += ["--temp-dir", str(self.temp_dir), "--disable-usage-stats"]
        args += ["--include-dashboard", "true" if self.dashboard else "false"]
        if self.dashboard:
            args += ["--dashboard-host", LOCAL_RAY_IP]
        return args

    def cleanup(self) -> None:
        """After its end: remove the temp dir made for it."""
        if self.own_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


# The local Ray this process started (start_local_ray), until shutdown_local_ray.
_started: LocalRay | None = None


def start_local_ray(ray_config: LocalRay) -> None:
    """Start ``ray_config``'s Ray in this process: its settings go into this process's environment
    first, so that every process of it (a single run's too) has them."""
    import ray

    global _started
    ray_config.apply(os.environ)
    adopt_orphans()
    _started = ray_config
    ray.init(**ray_config.init_kwargs())


def init_local_ray(num_cpus: int | None = None, num_gpus: int | None = None, dashboard: bool = False) -> None:
    """Join ``RAY_ADDRESS`` if set, else start a :class:`LocalRay` in this process with ``num_cpus``
    (default: the cores).

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
    cpus = local_ray_cpus(reserved=0.0) if num_cpus is None else num_cpus
    start_local_ray(LocalRay.create(cpus, dashboard=dashboard, num_gpus=num_gpus))


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
    from workers.procfs import environment

    return "RAY_RAYLET_PID" in (environment(pid) or {})


def end_orphans(grace_s: float = 5.0) -> list[str]:
    """End this process's children that run for a Ray (:func:`_ray_process`) and so outlived its
    shutdown: SIGTERM, SIGKILL after ``grace_s``, then reaped. Returns them as ``command (pid)``.

    After ``ray.shutdown()`` a worker that missed its raylet's end can stay, with its memory and a
    little CPU (seen: a Train controller after an interrupted search, still there 13 min later);
    :func:`adopt_orphans` made it this process's child. Other children are not touched."""
    import signal
    import time

    from workers.procfs import command_line, proc_stats

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
    what it ended (``who``: the command, for the message), then :meth:`LocalRay.cleanup`."""
    import ray

    global _started
    ray.shutdown()
    ended = end_orphans()
    if _started is not None:
        _started.cleanup()
        _started = None
    if ended:
        print(
            f"{who}: ended {len(ended)} process(es) the local Ray left running: {', '.join(ended)}",
            file=sys.stderr,
        )
