"""The Tune objects a spec's ``search`` section asks for: search space, searcher, scheduler, samples.
Also the CPUs a search needs; the rules of a search space are the spec's (:mod:`workers.spec.space`).

Keys of ``search.space`` are dotted spec paths (``loss.alpha``, ``train.lr``; a bare ``alpha``
means ``loss.alpha``); each entry is one of ``uniform``, ``loguniform``, ``choice`` or ``grid``.
Ray is imported inside the functions only.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from workers.spec import SearchSpec, Spec, resolve_param_path, search_space_problems
from workers.spec.base import _problems

__all__ = [
    "SearchSpaceError",
    "TRIAL_CPUS",
    "tune_param_space",
    "make_search_alg",
    "make_scheduler",
    "num_trials",
    "required_cpus",
    "least_cpus",
    "trial_cpus",
]

#: What a trial itself reserves: it only drives its trainers, which request the real resources;
#: Tune needs a non-empty request, and a tiny one lets the trainers have the whole CPU.
TRIAL_CPUS = 0.01


class SearchSpaceError(ValueError):
    """A ``search`` section cannot be run; the message names the field."""


def tune_param_space(spec: Spec) -> dict[str, Any]:
    """The Tune ``param_space`` of a spec's ``search.space``.

    Entries: ``uniform: [lo, hi]`` -> ``tune.uniform``, ``loguniform: [lo, hi]`` ->
    ``tune.loguniform``, ``choice: [...]`` -> ``tune.choice``, ``grid: [...]`` ->
    ``tune.grid_search``. With ``algorithm: grid`` a ``choice`` is searched exhaustively too; with
    ``algorithm: optuna`` a ``grid`` entry becomes a categorical (TPE cannot enumerate a grid).
    With ``algorithm: random`` grid entries are crossed with ``num_samples`` random draws of the
    others (Tune's semantics).

    The rules of a search space live in the spec (:func:`workers.spec.search_space_problems`,
    run by :meth:`Spec.parse`); a spec built otherwise is checked here by the same rules.

    Args:
        spec: a spec with a ``search`` section.

    Returns:
        dict: dotted spec path -> Tune domain.

    Raises:
        SearchSpaceError: the spec has no search section, or an entry is unusable (every problem
            named, as ``hdet spec check`` names them).
    """
    from ray import tune

    if spec.search is None:
        raise SearchSpaceError("search: the spec has no search section")
    try:
        SearchSpec.model_validate(spec.search.model_dump())
        problems = search_space_problems(spec)
    except ValidationError as e:
        problems = [(f"search.{p}", m) for p, m in _problems(e)]
    if problems:
        raise SearchSpaceError("; ".join(f"{p}: {m}" for p, m in problems))
    algorithm = spec.search.algorithm
    space: dict[str, Any] = {}
    for name, entry in spec.search.space.items():
        ((kind, values),) = entry.items()
        path = resolve_param_path(name)
        if kind == "uniform":
            space[path] = tune.uniform(float(values[0]), float(values[1]))
        elif kind == "loguniform":
            space[path] = tune.loguniform(float(values[0]), float(values[1]))
        elif kind == "grid" and algorithm != "optuna" or kind == "choice" and algorithm == "grid":
            space[path] = tune.grid_search(list(values))
        else:
            space[path] = tune.choice(list(values))
    return space


def make_search_alg(spec: Spec) -> Any:
    """The Tune search algorithm of ``search.algorithm``, limited to ``search.max_concurrent`` trials.

    ``random`` and ``grid``: Tune's ``BasicVariantGenerator`` (seeded with ``train.seed``, so a
    search is reproducible); ``optuna``: ``OptunaSearch`` (TPE) in a ``ConcurrencyLimiter``.
    """
    assert spec.search is not None
    s = spec.search
    if s.algorithm in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=s.max_concurrent, random_state=spec.train.seed)
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=spec.train.seed), max_concurrent=s.max_concurrent)


def make_scheduler(spec: Spec) -> Any:
    """FIFO, or ASHA with one rung step per epoch (``time_attr="epoch"``, ``max_t = train.epochs``),
    ``search.grace_period`` and ``search.reduction_factor``.

    ASHA halves by default (``reduction_factor: 2``) rather than quarters: searches here are a few
    configurations of a few epochs, and keeping a quarter would stop almost everything after the
    first epoch, where AP is mostly noise; a longer ``grace_period`` waits for AP to mean something.
    """
    assert spec.search is not None
    if spec.search.scheduler == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        max_t=spec.train.epochs,
        grace_period=spec.search.grace_period,
        reduction_factor=spec.search.reduction_factor,
    )


def num_trials(spec: Spec) -> int:
    """``num_samples`` for Tune: 1 pass over the grid for ``algorithm: grid``."""
    assert spec.search is not None
    return 1 if spec.search.algorithm == "grid" else spec.search.num_samples


def required_cpus(spec: Spec) -> float:
    """CPUs that let every concurrently running trainer start at once: (``max_concurrent`` + the
    baseline + the confirmatory arm) configurations x seeds x workers x CPUs per worker, plus what
    the running trials reserve themselves (:data:`TRIAL_CPUS` each). With fewer, trainers queue for
    resources (correct, but a queued trainer's trial start then includes the wait, and ASHA sees
    each trial's seed mean later)."""
    s = spec.scaling
    per_trainer = s.num_workers * s.cpus_per_worker
    if spec.search is None:
        return per_trainer
    searched = spec.search.max_concurrent if spec.search.space else 0
    configs = searched + int(spec.search.baseline) + int(spec.search.confirmatory)
    return configs * len(spec.search.seeds) * per_trainer + searched * TRIAL_CPUS


def least_cpus(spec: Spec) -> float:
    """The fewest CPUs an experiment progresses with: one trainer (``num_workers`` x
    ``cpus_per_worker``) plus :func:`trial_cpus`. Trainers beyond what the CPUs hold wait their
    turn, so a comparison of many seeds runs a few trainings at a time instead of all of them
    oversubscribed."""
    s = spec.scaling
    return s.num_workers * s.cpus_per_worker + trial_cpus(spec)


def trial_cpus(spec: Spec) -> float:
    """What the Tune trials running at once reserve themselves (:data:`TRIAL_CPUS` each)."""
    if spec.search is None or not spec.search.space:
        return 0.0
    return spec.search.max_concurrent * TRIAL_CPUS
