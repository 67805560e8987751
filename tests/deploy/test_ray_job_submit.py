"""The laptop path, as the README writes it: the real `ray job submit` CLI against a real Ray head with
token auth, the working directory uploaded (without data, caches and virtual environments), the job
run by the head's `python` (the activated virtual environment), and its finished parent run found in
MLflow.

The head is started by this test with its own temp dir, HOME (so neither its token nor the client's
comes from ~/.ray/auth_token) and free ports, including the dashboard's and the per-node Jobs
agent's; it is stopped through its own process group, never with `ray stop` (another Ray may run on
the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from deploy_checks import stop_group

from workers.tracking import PARENT_ROLE, Tag

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: The command of the README's deployment section, verbatim; the test replaces HEAD:8265 by its head's
#: dashboard and the spec by a smaller one.
README_COMMAND = (
    "ray job submit --address http://HEAD:8265 --working-dir . -- python -m workers.run configs/tiny.yaml"
)
README_FILES = (ROOT / "README.md",)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Head:
    dashboard: str
    token: str
    env: dict[str, str]  # an activated venv's environment, without the token
    tracking_uri: str
    log: Path


def _activated_env(home: Path) -> dict[str, str]:
    """The environment of a shell that ran `source .venv/bin/activate`, with HOME of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
        HOME=str(home),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the Ray head did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A short path: Ray's unix sockets live under the temp dir (at most 107 characters).
    tmp = Path(tempfile.mkdtemp(prefix="hdet-rjs-", dir="/tmp"))
    (tmp / "home").mkdir()
    env = _activated_env(tmp / "home")
    token = secrets.token_hex(32)
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    gcs, dashboard, agent_http, agent_grpc, metrics, runtime_env, client, node_manager, object_manager = (
        _free_ports(9)
    )
    # What deploy/compose.yaml and KubeRay give every Ray node: token auth on, MLflow, storage.
    head_env = {
        **env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "HDET_HOME": str(tmp / "hdet"),
        "HDET_STORAGE_PATH": str(tmp / "storage"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = tmp / "ray-start.log"
    cmd = [
        "ray", "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=head_env,
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, by its id
            executable=shutil.which("ray", path=env["PATH"]),
        )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_healthy(f"{url}/api/gcs_healthz", proc, log, timeout=180)
        _wait_healthy(f"http://127.0.0.1:{agent_http}/api/local_raylet_healthz", proc, log, timeout=180)
        yield Head(dashboard=url, token=token, env=env, tracking_uri=tracking_uri, log=log)
    finally:
        stop_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _readme_argv(head: Head, spec: Path) -> list[str]:
    argv = README_COMMAND.replace("http://HEAD:8265", head.dashboard).split()
    assert argv[-1] == "configs/tiny.yaml"
    return [*argv[:-1], str(spec)]


def test_the_readme_shows_the_tested_command() -> None:
    texts = [p.read_text() for p in README_FILES if p.is_file()]
    assert any(README_COMMAND in t for t in texts), f"none of {README_FILES} shows: {README_COMMAND}"
    assert any(
        "export RAY_AUTH_MODE=token" in t and "RAY_AUTH_TOKEN=" in t and "source .venv/bin/activate" in t
        for t in texts
    )


def test_a_client_without_the_token_is_refused(head: Head) -> None:
    out = subprocess.run(
        ["ray", "job", "list", "--address", head.dashboard],
        env=head.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        executable=shutil.which("ray", path=head.env["PATH"]),
    )
    assert out.returncode != 0
    assert "Authentication required" in out.stdout + out.stderr


def test_ray_job_submit_as_the_readme_writes_it_finishes_a_run_in_mlflow(head: Head, tmp_path: Path) -> None:
    # configs/tiny.yaml made smaller: one epoch, a handful of images, one worker.
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["name"] = "rjs-tiny"
    data["dataset"].update(train=4, val=2, test=2)
    data["train"].update(epochs=1, batch_size=2)
    data["scaling"].update(num_workers=1, max_failures=0)
    data["tracking"] = {"experiment": "ray-job-submit"}
    spec = tmp_path / "rjs-tiny.yaml"
    spec.write_text(yaml.safe_dump(data))

    # As the README says: both, or the CLI sends no token (RAY_AUTH_MODE is a client setting too).
    client_env = {**head.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}
    started = time.monotonic()
    out = subprocess.run(
        _readme_argv(head, spec),
        env=client_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        executable=shutil.which("ray", path=client_env["PATH"]),
    )
    took = time.monotonic() - started
    output = out.stdout + out.stderr
    assert out.returncode == 0, f"ray job submit exited {out.returncode}:\n{output[-4000:]}"
    assert "succeeded" in output, output[-4000:]
    print(f"ray job submit: {took:.0f} s")

    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=head.tracking_uri)
    exp = c.get_experiment_by_name("ray-job-submit")
    assert exp is not None, "the job wrote no MLflow experiment"
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(Tag.ROLE) == PARENT_ROLE]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags.get(Tag.SPEC_NAME) == "rjs-tiny"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert children and all(r.info.status == "FINISHED" for r in children)
    assert any("AP" in r.data.metrics for r in children)


@pytest.mark.parametrize("with_gitignore", [True, False])
def test_the_uploaded_working_dir_leaves_out_data_caches_and_environments(
    tmp_path: Path, with_gitignore: bool
) -> None:
    """What `--working-dir .` uploads, built by Ray's own packaging (.rayignore, and .gitignore unless
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 turns it off: .rayignore alone must be enough)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "working_dir.zip"
    create_package(str(ROOT), package, include_gitignore=with_gitignore)
    names = zipfile.ZipFile(package).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"workers", "harmonic", "configs"} <= tops
    assert not tops & {".venv", ".hdet", ".git", "data", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
    assert not [n for n in names if "__pycache__" in n]
    size = package.stat().st_size
    print(f"working_dir upload: {size / 1e6:.2f} MB, {len(names)} files")
    assert size < 5_000_000
