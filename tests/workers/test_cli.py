"""The ``hdet`` router: a group of commands (``hdet bench``) lists its own with ``--help``, an
unknown command is refused with the list, and a routed module that is not installed says so."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers.cli import COMMANDS, main


def test_a_group_lists_its_commands_on_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[:2] for line in out.splitlines() if line.startswith("  ")]
    assert listed == [list(words) for words in COMMANDS if words[0] == "bench"]
    assert "usage: hdet bench COMMAND" in out


def test_an_unknown_command_of_a_group_is_refused_with_the_groups_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "nothing"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bench nothing'" in err and "bench train" in err and "serve" not in err


def test_a_bench_command_without_the_benchmarks_package_says_so() -> None:
    code = "import sys\nsys.modules['benchmarks'] = None\nfrom workers.cli import main\nsys.exit(main(['bench', 'api']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "hdet bench api: benchmarks.api is not installed here" in done.stderr
