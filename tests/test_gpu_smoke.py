"""scripts/gpu_smoke.sh runs here, without a GPU: its options, its answer on a CPU-only machine, and
(``--device cpu``) its whole path on one small arch, so its first run on a GPU is not its first run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.sh"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_help_names_the_options_and_the_time_limit() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    for words in ("5 minutes", "--archs", "--amp", "--image-size", "--steps", "--device", "--budget-s"):
        assert words in done.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--steps", "3"], "--steps must be > 3"),
        (["--amp", "fp8"], "invalid choice"),
        (["--archs", "yolo"], "yolo"),
    ],
)
def test_bad_options_are_refused_with_status_2(args: list[str], words: str) -> None:
    done = _run(*args)
    assert done.returncode == 2
    assert words in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "torch " in done.stdout and "CUDA of the torch build" in done.stdout
    assert "needs a GPU" in done.stdout
    assert "arch" not in done.stdout.split("needs a GPU")[1]  # nothing was trained


@pytest.mark.integration  # trains two small models: 15-60 s on a busy 2-core machine
def test_on_the_cpu_it_checks_trains_and_prints_one_table() -> None:
    done = _run(
        "--device", "cpu", "--archs", "retinanet", "--steps", "4", "--batch", "1", "--image-size", "64",
        "--backbone", "resnet18_fpn",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "fp16 IoU of identical 400 px boxes         ok" in out
    assert "FCOS IoU under autocast = float32's        ok" in out
    assert "DDP, 2 processes (NCCL)                    skip" in out
    assert "training: bf16 autocast, 64 px" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("retinanet")]
    assert [r[1] for r in rows] == ["standard", "harmonicdet"]
    assert all(r[2] == "resnet18_fpn" and r[3] == "yes" and float(r[4]) > 0 for r in rows)
    assert out.rstrip().splitlines()[-1].startswith("passed")
