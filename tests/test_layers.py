"""The packages' layering: imports only go down (harmonic <- workers <- service), harmonic knows
neither pydantic nor Ray nor MLflow, and the light entry points stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """Module file -> every module it imports (at any depth: function-level imports count too)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path} imports {name}"
        for path, names in _imports(package).items()
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_harmonic_imports_nothing_above_it() -> None:
    bad = _offenders("harmonic", ("workers", "service", "pydantic", "ray", "mlflow", "fastapi"))
    assert not bad, "harmonic/ must stay plain PyTorch:\n" + "\n".join(bad)


def test_workers_do_not_import_the_service() -> None:
    bad = _offenders("workers", ("service",))
    assert not bad, "\n".join(bad)


#: the benchmarks' machinery: their commands, turns, baselines, process accounting and marks.
BENCHMARK_MODULES = (
    "workers.bench",
    "workers.bench_train",
    "workers.pace",
    "workers.plain_loop",
    "workers.cpu_share",
    "workers.timeline",
)
#: the training step and what builds it: they reach the benchmarks only through workers.hooks.
TRAINING_MODULES = (
    "workers/worker_loop.py",
    "workers/epoch_metrics.py",
    "workers/recipe.py",
    "workers/trainer.py",
    "workers/train_state.py",
    "workers/run_tracking.py",
    "workers/hooks.py",
)


def test_the_training_step_does_not_import_the_benchmarks() -> None:
    bad = [line for line in _offenders("workers", BENCHMARK_MODULES) if line.split()[0] in TRAINING_MODULES]
    assert not bad, "the training loop knows benchmarks only as hooks (workers.hooks):\n" + "\n".join(bad)
    harmonic = _offenders("harmonic", BENCHMARK_MODULES)
    assert not harmonic, "\n".join(harmonic)


def test_the_search_imports_no_benchmark_but_the_start_up_marks() -> None:
    bad = [
        line
        for line in _offenders("workers", tuple(m for m in BENCHMARK_MODULES if m != "workers.timeline"))
        if line.startswith("workers/search/")
    ]
    assert not bad, "\n".join(bad)


def test_evaluation_does_not_import_the_analyses() -> None:
    """harmonic.analysis builds on harmonic.eval, never the other way round (no cycle)."""
    bad = [
        line for line in _offenders("harmonic", ("harmonic.analysis",)) if line.startswith("harmonic/eval/")
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("workers.predict", ("ray",)),
        ("workers.spec", ("torch", "scipy", "pycocotools", "PIL", "ray", "mlflow")),
        ("workers.tracking", ("torch", "ray")),
        ("workers.cli", ("torch", "ray", "mlflow")),
        # opening a dataset (every trial does) does not load the synthetic generator's stack
        ("harmonic.data.factory", ("scipy", "contourpy")),
    ],
)
def test_light_entry_points(module: str, absent: tuple[str, ...]) -> None:
    code = f"import sys, {module}\nprint(','.join(m for m in {absent!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"importing {module} imported {done.stdout.strip()}"
