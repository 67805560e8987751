"""hdet bench search's two regimes give valid specs; the pretrained one shares the demo's body."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.search import DEMO_SPEC, SEARCH_REGIMES, _search_bench_spec
from workers.pretrain import pretrain_key
from workers.spec import Spec


def _args(regime: str) -> argparse.Namespace:
    return argparse.Namespace(
        regime=regime, seeds=[0], max_concurrent=2, cpus_per_trainer=1.0, **SEARCH_REGIMES[regime]
    )


@pytest.mark.parametrize("regime", sorted(SEARCH_REGIMES))
def test_both_searches_of_a_regime_are_valid_specs(regime: str, tmp_path: Path) -> None:
    args = _args(regime)
    grid = Spec.parse(_search_bench_spec(args, tmp_path, "g", {"space": {"alpha": {"grid": [0.5, 2.5]}}}))
    assert grid.detector.arch == args.arch and grid.dataset.train == args.images
    assert grid.search is not None and grid.search.seeds == [0]
    assert (grid.pretrain is not None) == (regime == "pretrained")


def test_the_pretrained_regime_uses_the_demos_body_and_recipe(tmp_path: Path) -> None:
    bench = Spec.parse(
        _search_bench_spec(_args("pretrained"), tmp_path, "g", {"space": {"alpha": {"grid": [1.0]}}})
    )
    demo = Spec.from_file(DEMO_SPEC, check_paths=False)
    assert pretrain_key(bench) == pretrain_key(demo)  # the demo's cached pretraining serves the bench
    assert bench.train.augment == demo.train.augment and bench.train.optimizer == demo.train.optimizer
    assert bench.eval == demo.eval
    assert bench.dataset.seed == demo.dataset.seed and bench.dataset.train < demo.dataset.train
