"""The packages' layering: imports only go down (harmonic <- workers <- service <- benchmarks),
harmonic knows neither pydantic nor Ray nor MLflow, no product module imports the benchmarks (the
CLI names them, by string), and the light entry points stay light."""

from __future__ import annotations

import ast
import re
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


#: the contract the service shares with the workers: the spec, the MLflow schema, the evidence read
#: back from MLflow, and the statistics and renderers over it.
CONTRACT = ("workers/spec", "workers/summary", "workers/evidence", "workers/report", "workers/tracking.py")
#: what runs trainings: the contract never imports it, nor Ray.
RAY_SIDE = ("workers.training", "workers.search", "workers.run", "ray")


def _edges(places: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """What the files of ``places`` (folders or files of workers/) import of ``forbidden``, or name by
    string (its ``workers.`` modules)."""

    def within(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in places)

    bad = [line for line in _offenders("workers", forbidden) if within(line.split(" imports ")[0])]
    return bad + [
        f"{path} names {name}"
        for top in forbidden
        if top.startswith("workers.")
        for path, names in _module_names("workers", top).items()
        if within(path)
        for name in sorted(names)
    ]


def test_the_contract_imports_neither_ray_nor_the_trainings() -> None:
    bad = _edges(CONTRACT, RAY_SIDE)
    assert not bad, "the contract stays below the Ray side:\n" + "\n".join(bad)


def test_a_training_never_imports_the_search_or_the_driver() -> None:
    bad = _edges(("workers/training",), ("workers.search", "workers.run", "workers.cli"))
    assert not bad, "\n".join(bad)


def test_the_service_imports_the_contract_and_no_training() -> None:
    bad = _offenders(
        "service", ("workers.training", "workers.search", "workers.run", "workers.pretrain", "ray.train")
    )
    assert not bad, "the service reaches trainings only through Ray's Jobs API:\n" + "\n".join(bad)


#: the product packages: none of them imports the benchmarks.
PRODUCT = ("harmonic", "workers", "service")
#: where a product module names a benchmark module (by string, never importing it): the CLI routes
#: ``hdet bench X`` to ``benchmarks.X`` when that command runs.
NAMED_BENCHMARKS = {
    "workers/cli.py": {
        "benchmarks.api",
        "benchmarks.eval",
        "benchmarks.experiment",
        "benchmarks.loss",
        "benchmarks.search",
        "benchmarks.train",
    }
}


def _module_names(package: str, top: str) -> dict[str, set[str]]:
    """Module file -> the string constants that name a module of ``top`` (``top.x``, or an entry
    ``top.x:attr`` as HDET_TRAIN_HOOKS takes): imports by name, which :func:`_imports` cannot see."""
    pattern = re.compile(rf"{top}(\.\w+)*(:\w+)?")
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = {
            node.value.split(":")[0]
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and pattern.fullmatch(node.value)
        }
        if names:
            out[str(path.relative_to(ROOT))] = names
    return out


def _defines(module: str, name: str) -> bool:
    """Whether the top level of ``module`` (a file of this repository) defines ``name``."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    return name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}


def test_no_product_module_imports_the_benchmarks() -> None:
    bad = [line for package in PRODUCT for line in _offenders(package, ("benchmarks",))]
    assert not bad, "the benchmarks sit on top; nothing below imports them:\n" + "\n".join(bad)
    named = {
        path: names for package in PRODUCT for path, names in _module_names(package, "benchmarks").items()
    }
    assert named == NAMED_BENCHMARKS, (
        f"only the CLI's routing table may name benchmark modules, and exactly these: {named}"
    )


def test_every_bench_command_routes_to_a_benchmark_module_that_has_its_function() -> None:
    from workers.cli import COMMANDS

    routes = {words: (module, func) for words, (module, func, _) in COMMANDS.items() if words[0] == "bench"}
    assert {module for module, _ in routes.values()} == NAMED_BENCHMARKS["workers/cli.py"]
    for words, (module, func) in routes.items():
        assert module == f"benchmarks.{words[1]}", f"hdet {' '.join(words)} routes to {module}"
        assert _defines(module, func), f"{module} has no function {func}"


def test_the_benchmarks_training_hooks_name_their_own_factories() -> None:
    """Each ``HOOK`` entry (``module:factory``) that a benchmark puts in HDET_TRAIN_HOOKS names a
    factory of its own module: a Ray worker imports it by that name."""
    hooks = {
        (str(path.relative_to(ROOT)), node.value.value)
        for path in sorted((ROOT / "benchmarks").glob("*.py"))
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "HOOK" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    }
    assert {path for path, _ in hooks} == {"benchmarks/pace.py", "benchmarks/timeline.py"}
    for path, entry in hooks:
        module, _, factory = entry.partition(":")
        assert module.replace(".", "/") + ".py" == path and _defines(module, factory), entry


def test_the_benchmarks_import_the_product_never_the_tests_or_scripts() -> None:
    bad = _offenders("benchmarks", ("tests", "scripts", "faults", "conftest"))
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
