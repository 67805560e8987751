"""The README is true as written: every code block marked ``<!-- tested -->`` runs in a fresh shell.

Bash blocks run with ``bash -e`` in a clean environment (no activated venv, no PYTHONPATH) from a
scratch folder that holds the checkout's ``configs`` and ``.venv`` as the README expects them;
Python blocks run with the project's interpreter there. Only cheap commands are marked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- tested -->\n```(bash|python)\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def test_the_readme_marks_its_newcomer_path() -> None:
    kinds = [kind for kind, _ in _blocks()]
    assert "bash" in kinds and "python" in kinds


@pytest.mark.parametrize(("kind", "code"), _blocks(), ids=lambda v: v if v in ("bash", "python") else "")
def test_readme_block_runs_as_written(kind: str, code: str, tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HDET_HOME": str(tmp_path / ".hdet"),
        "LANG": "C.UTF-8",
    }
    if kind == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        cmd = [str(venv / "bin" / "python"), "-c", code]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"README {kind} block failed:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
