"""deploy/compose.yaml: valid against the Compose specification, healthy-before-dependent start order,
ports on 127.0.0.1 only, secrets from the uncommitted env file, one shared volume for Ray's storage
and MLflow's artifacts, a GPU worker; and MLflow's --allowed-hosts tried on a real MLflow server."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import DEPLOY, KUBE, ROOT, load, named, stop_group

COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "env.example"
LONG_RUNNING = ("postgres", "mlflow", "ray-head", "ray-worker", "api")


def _example_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and line[0] != "#")
    return dict(pairs)


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``), as
    `docker compose config` does before it validates; a required variable that is unset is an error."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op == ":?" and not value:
            raise ValueError(f"{name}: {arg}")
        if op == ":-" and not value:
            return str(arg)
        return value

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", sub, text)


def _validate(text: str) -> Any:
    from compose_spec import PyCompose

    # deploy/.env as a user fills it in from env.example (the secrets set to placeholders).
    env = {k: v or f"example-{k.lower()}" for k, v in _example_env().items()}
    compose = PyCompose.from_yaml(_interpolate(text, env))  # ValueError naming the path on any violation
    compose.validate()
    compose.validate_volumes()
    compose.validate_networks()
    compose.validate_secrets()
    compose.validate_configs()
    return compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_follows_the_compose_specification() -> None:
    c = _validate(COMPOSE.read_text())
    assert set(LONG_RUNNING) <= set(c.service_names())


@pytest.mark.parametrize(
    "old, new, words",
    [
        ("    shm_size: 16gb", "    shm_sizes: 16gb", "shm_sizes"),
        ("condition: service_healthy", "condition: service_healty", "service_healty"),
        ("      retries: 5", "      retries: five", "retries"),
    ],
)
def test_a_broken_compose_file_is_refused(old: str, new: str, words: str) -> None:
    text = COMPOSE.read_text()
    assert old in text
    with pytest.raises(ValueError, match=words):
        _validate(text.replace(old, new, 1))


def _interpolated(value: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", value))


def test_services_start_healthy_in_order_and_publish_on_loopback_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in LONG_RUNNING:
        svc = services[name]
        assert svc["healthcheck"]["test"][0] == "CMD", name
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond 127.0.0.1"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no health check"
    assert "ports" not in services["postgres"] and "ports" not in services["ray-worker"]


def test_the_gpu_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    assert "--num-gpus=1" in worker["command"] and "--address=ray-head:6379" in worker["command"]
    head = compose["services"]["ray-head"]["command"]
    assert "--num-cpus=0" in head and "--num-gpus=0" in head  # the head trains nothing


def test_secrets_come_from_the_uncommitted_env_file(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    used = _interpolated(text)
    example = _example_env()
    assert used <= set(example), f"variables missing from {ENV_EXAMPLE.name}: {used - set(example)}"
    for secret in ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "HDET_API_TOKEN"):
        assert example[secret] == "", f"{ENV_EXAMPLE.name} must not carry a value for {secret}"
        assert f"${{{secret}:?" in text, f"{secret} must be required (${{{secret}:?...}})"
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/.env (the compose secrets) is not ignored by git"
    for svc in ("ray-head", "ray-worker", "api"):
        env = compose["services"][svc]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env, svc


def test_ray_storage_and_mlflow_artifacts_share_one_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {
        name: {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        for name in ("mlflow", "ray-head", "ray-worker")
    }
    volume = mounts["ray-head"]["/data"]
    assert volume in compose["volumes"]
    assert all(m["/data"] == volume for m in mounts.values())
    env = services["ray-head"]["environment"]
    assert env is services["ray-worker"]["environment"] or env == services["ray-worker"]["environment"]
    assert env["HDET_STORAGE_PATH"].startswith("/data/")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    (dest,) = [
        a.split("=", 1)[1] for a in services["mlflow"]["command"] if a.startswith("--artifacts-destination=")
    ]
    assert dest.startswith("/data/")


def test_the_api_service_runs_hdet_serve_on_the_stack(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    command = api["command"]
    assert command[:3] == ["hdet", "serve", "--host=0.0.0.0"]
    # Given both, `hdet serve` starts no Ray head or MLflow server of its own.
    assert "--ray-address=http://ray-head:8265" in command and "--mlflow-uri=http://mlflow:5000" in command
    env = api["environment"]
    assert "RAY_ADDRESS" not in env  # the service refuses a RAY_ADDRESS other than its own address
    assert env["HDET_API_TOKEN"].startswith("${HDET_API_TOKEN:?")  # required off loopback


# -- MLflow's Host check, on the installed MLflow ---------------------------------------------------


def _mlflow_flag(args: list[str], flag: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]
    return value


def _k8s_mlflow_args() -> list[str]:
    (deployment,) = [d for d in load(KUBE / "base" / "mlflow.yaml") if d["kind"] == "Deployment"]
    return list(
        named([deployment], "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    )


@pytest.mark.parametrize(
    "source, allowed, refused",
    [
        (
            "compose",
            ["mlflow:5000", "127.0.0.1:5000", "localhost:5000"],
            ["evil.example.com", "mlflow.evil.com:5000"],
        ),
        (
            "kubernetes",
            [
                "mlflow:5000",
                "mlflow.harmonicdet.svc:5000",
                "mlflow.harmonicdet.svc.cluster.local:5000",
                "127.0.0.1:5000",
            ],
            ["evil.example.com", "10.0.0.7:5000"],
        ),
    ],
)
def test_mlflow_allows_the_hosts_the_deployment_uses(
    source: str, allowed: list[str], refused: list[str]
) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    args = (
        yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]["command"]
        if source == "compose"
        else _k8s_mlflow_args()
    )
    hosts = [h.strip() for h in _mlflow_flag(args, "--allowed-hosts").split(",")]
    assert "*" not in hosts
    for host in allowed:
        assert is_allowed_host_header(hosts, host), host
    for host in refused:
        assert not is_allowed_host_header(hosts, host), host


@pytest.fixture(scope="module")
def mlflow_server(
    request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[str]:
    """A real `mlflow server` with compose's --allowed-hosts and --cors-allowed-origins."""
    args = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]["command"]
    tmp = scratch(request, "mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{tmp / 'db.sqlite'}",
            f"--artifacts-destination={tmp / 'artifacts'}",
            f"--allowed-hosts={_mlflow_flag(args, '--allowed-hosts')}",
            f"--cors-allowed-origins={_mlflow_flag(args, '--cors-allowed-origins')}",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
        start_new_session=True,  # its own process group: the server's workers stop with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        stop_group(proc)
        log.close()


def _status(url: str, host: str) -> int:
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_a_real_mlflow_server_answers_the_service_name_and_refuses_others(mlflow_server: str) -> None:
    assert _status(mlflow_server, "mlflow:5000") == 200  # how the Ray nodes and the API reach it
    assert _status(mlflow_server, "127.0.0.1:5000") == 200  # the SSH tunnel / browser
    assert _status(mlflow_server, "evil.example.com") == 403
