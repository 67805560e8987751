"""Search-space translation: each entry kind, each algorithm, and bad entries named in the error."""

from __future__ import annotations

from typing import Any

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, LogUniform

from workers.search import (
    TRIAL_CPUS,
    SearchSpaceError,
    least_cpus,
    make_scheduler,
    make_search_alg,
    num_trials,
    required_cpus,
    trial_cpus,
    tune_param_space,
)
from workers.spec import Spec, SpecError


def _spec(space: dict[str, Any], **search: Any) -> Spec:
    data = {
        "name": "s",
        "dataset": {"format": "synthetic", "train": 8, "val": 4, "image_size": 64},
        "train": {"epochs": 3},
        "search": {"space": {"alpha": {"choice": [1.0]}}, **search},
    }
    spec = Spec.parse(data, check_paths=False)
    # The spec's own validation rejects most bad entries already; the search must not rely on it
    # (specs reach it from the API too), so the raw space is put in place unvalidated.
    assert spec.search is not None
    spec.search.space = space
    return spec


def test_each_entry_kind_becomes_its_tune_domain():
    space = tune_param_space(
        _spec(
            {
                "alpha": {"uniform": [0.5, 2.5]},
                "train.lr": {"loguniform": [1e-4, 1e-2]},
                "margin": {"choice": [0.1, 0.2]},
                "gamma": {"grid": [0.2, 0.8]},
            }
        )
    )
    assert set(space) == {"loss.alpha", "train.lr", "loss.margin", "loss.gamma"}
    assert isinstance(space["loss.alpha"], Float) and (
        space["loss.alpha"].lower,
        space["loss.alpha"].upper,
    ) == (0.5, 2.5)
    assert isinstance(space["train.lr"].sampler, LogUniform)
    assert isinstance(space["loss.margin"], Categorical) and space["loss.margin"].categories == [0.1, 0.2]
    assert space["loss.gamma"] == {"grid_search": [0.2, 0.8]}


def test_grid_algorithm_enumerates_choices_and_optuna_treats_grid_as_categorical():
    grid = tune_param_space(
        _spec({"margin": {"choice": [0.1, 0.2]}, "gamma": {"grid": [0.5]}}, algorithm="grid")
    )
    assert grid == {"loss.margin": {"grid_search": [0.1, 0.2]}, "loss.gamma": {"grid_search": [0.5]}}
    opt = tune_param_space(_spec({"gamma": {"grid": [0.2, 0.8]}}, algorithm="optuna"))
    assert isinstance(opt["loss.gamma"], Categorical)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"gamma": {"uniform": [0.0, 1.5]}}, r"search\.space\.gamma\.uniform: value 1\.5 .*loss\.gamma"),
        ({"margin": {"choice": [0.1, -0.2]}}, r"search\.space\.margin\.choice: value -0\.2"),
        ({"train.epochs": {"uniform": [1, 3]}}, r"search\.space\.train\.epochs\.uniform: value 1\.74"),
        ({"train.seed": {"choice": [0, 1]}}, r"search\.space\.train\.seed: .*search\.seeds"),
        ({"alpha": {"normal": [0, 1]}}, r"search\.space\.alpha: unknown entry 'normal'"),
        ({"alpha": {"uniform": [2.0, 1.0]}}, r"search\.space\.alpha\.uniform: lo must be < hi"),
        ({"alpha": {"uniform": [1.0]}}, r"search\.space\.alpha\.uniform: must be \[lo, hi\]"),
        ({"train.lr": {"loguniform": [0.0, 1.0]}}, r"search\.space\.train\.lr\.loguniform: lo must be > 0"),
        ({"nope": {"choice": [1]}}, r"search\.space\.nope: 'nope' is not a field"),
        ({"alpha": {"choice": []}}, r"search\.space\.alpha\.choice: must be a non-empty list"),
    ],
)
def test_bad_entries_name_the_field(space: dict[str, Any], message: str):
    with pytest.raises(SearchSpaceError, match=message):
        tune_param_space(_spec(space))


def test_grid_cannot_sample_a_range():
    spec = _spec({"margin": {"choice": [0.1]}}, algorithm="grid")
    assert spec.search is not None
    spec.search.space = {"alpha": {"uniform": [0.5, 1.0]}}
    with pytest.raises(SearchSpaceError, match=r"search\.space\.alpha: algorithm grid cannot sample"):
        tune_param_space(spec)


def test_searchers_schedulers_and_budget():
    rnd = _spec(
        {"alpha": {"uniform": [0.5, 1.0]}}, num_samples=5, max_concurrent=3, seeds=[0, 1, 2], baseline=True
    )
    assert isinstance(make_search_alg(rnd), BasicVariantGenerator)
    assert num_trials(rnd) == 5
    assert isinstance(make_scheduler(rnd), FIFOScheduler)
    # every trainer of the running trials and of the baseline, plus the trials themselves
    assert required_cpus(rnd) == pytest.approx((3 + 1) * 3 * 1.0 + 3 * TRIAL_CPUS)
    # the least it progresses with (hdet run sizes a local Ray to the cores, at least this): one
    # trainer and the running trials' own reservations; the other trainers wait their turn
    assert trial_cpus(rnd) == pytest.approx(3 * TRIAL_CPUS)
    assert least_cpus(rnd) == pytest.approx(1.0 + 3 * TRIAL_CPUS)
    comparison = _spec({}, seeds=[0, 1, 2], baseline=True)
    assert trial_cpus(comparison) == 0.0 and least_cpus(comparison) == pytest.approx(1.0)
    opt = _spec({"alpha": {"uniform": [0.5, 1.0]}}, algorithm="optuna", scheduler="asha", max_concurrent=2)
    alg = make_search_alg(opt)
    assert isinstance(alg, ConcurrencyLimiter) and isinstance(alg.searcher, OptunaSearch)
    assert alg.max_concurrent == 2
    asha = make_scheduler(opt)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "epoch" and asha._max_t == 3
    assert asha._reduction_factor == 2 and [m for m, _ in asha._brackets[0]._rungs] == [2, 1]
    patient = make_scheduler(_spec({}, scheduler="asha", grace_period=2, reduction_factor=3.0))
    assert patient._reduction_factor == 3.0 and [m for m, _ in patient._brackets[0]._rungs] == [2]
    with pytest.raises(SpecError, match=r"grace_period \(4\) must be <= train.epochs \(3\)"):
        _spec({}, scheduler="asha", grace_period=4)
    assert num_trials(_spec({"margin": {"grid": [0.1, 0.2]}}, algorithm="grid", num_samples=7)) == 1


def test_optuna_searcher_suggests_inside_the_space():
    # The installed optuna works with Ray's OptunaSearch: suggest, learn from results, suggest again.
    spec = _spec({"alpha": {"uniform": [0.5, 1.0]}, "margin": {"choice": [0.1, 0.3]}}, algorithm="optuna")
    searcher = OptunaSearch(seed=0)
    searcher.set_search_properties("AP", "max", tune_param_space(spec))
    for i in range(6):
        cfg = searcher.suggest(f"t{i}")
        assert 0.5 <= cfg["loss.alpha"] <= 1.0 and cfg["loss.margin"] in (0.1, 0.3)
        searcher.on_trial_result(f"t{i}", {"AP": cfg["loss.alpha"], "epoch": 1, "training_iteration": 1})
        searcher.on_trial_complete(f"t{i}", {"AP": cfg["loss.alpha"], "epoch": 1, "training_iteration": 1})
    assert tune.uniform(0, 1) is not None
