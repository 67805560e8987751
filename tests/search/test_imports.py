"""How the search's modules depend on each other: the summary is readable without Ray, and the
renderers import the summary, never the reverse at import time."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_the_summary_imports_without_ray() -> None:
    _run("import workers.summary, sys; assert 'ray' not in sys.modules")


def test_the_report_imports_without_ray_and_the_summary_without_the_report() -> None:
    _run("import workers.report, sys; assert 'ray' not in sys.modules")
    _run("import workers.summary, sys; assert 'workers.report' not in sys.modules")
