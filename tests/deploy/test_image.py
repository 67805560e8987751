"""deploy/Dockerfile: linted by hadolint (no container engine on the development machines and CI, so
the image is not built here), non-root, health-checked, cache-free, and pinned like pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_checks import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: it comes with the test extra (pip install -e '.[test]')")
    # --config /dev/null: the rules as shipped, whatever .hadolint.yaml a machine has.
    return subprocess.run(
        [exe, "--no-color", "--config", "/dev/null", str(path)], capture_output=True, text=True, timeout=60
    )


def test_the_dockerfile_passes_hadolint() -> None:
    out = _hadolint(DOCKERFILE)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_a_root_image_fails_hadolint(tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    assert "USER 1000:1000" in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("USER 1000:1000", "USER root"))
    out = _hadolint(broken)
    assert out.returncode != 0 and "DL3002" in out.stdout


def test_the_image_is_non_root_health_checked_and_cache_free() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK\b", text, re.M)
    for line in re.findall(r"pip install[^\n]*", text):
        assert "--no-cache-dir" in line, line
    assert "PIP_NO_CACHE_DIR=1" in text
    assert "apt-get" not in text or "rm -rf /var/lib/apt/lists" in text


def test_the_image_pins_torch_as_pyproject_does() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pkg in ("torch", "torchvision"):
        (pin,) = [d for d in deps if d.startswith(f"{pkg}==")]
        assert pin in DOCKERFILE.read_text(), f"deploy/Dockerfile does not install {pin}"


def test_the_build_context_leaves_data_and_environments_out() -> None:
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line]
    assert "*" in ignore  # everything out, then only the sources the image copies back in
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+)", DOCKERFILE.read_text(), re.M)
    for src in copied:
        if not src.startswith("/"):  # not from the build stage
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"COPY {src}: left out of the build context"
