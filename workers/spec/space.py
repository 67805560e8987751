"""The search section and every rule of a search space: names resolved to spec fields, entries
checked, and each value a trial can get checked to give a valid spec.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    field_validator,
    model_validator,
)

from workers.spec.base import _STRICT, SpecError
from workers.spec.sections import DetectorSpec, LossSpec, TrainSpec

if TYPE_CHECKING:
    from workers.spec.model import Spec

SpaceEntry = dict[str, list[Any]]

#: what an arm of ``search.arms`` may be called (a tag value, a run key and a metric name's part).
ARM_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
#: names the comparison's own arms and the report's labels already use.
RESERVED_ARMS = frozenset({"baseline", "confirmatory", "best", "best_confirmed", "search", "arm"})


class SearchSpec(BaseModel):
    """A Tune search over loss or recipe options, every configuration trained on every seed; absent: one training run."""

    model_config = _STRICT

    space: dict[str, SpaceEntry] = Field(
        description=(
            "param -> {uniform|loguniform: [lo, hi]} | {choice: [...]} | {grid: [...]}; empty ({}) with "
            "confirmatory: a comparison of the fixed arms without a search"
        )
    )
    algorithm: Literal["random", "grid", "optuna"] = Field(
        default="random", description="random sampling, the full grid, or Optuna TPE"
    )
    scheduler: Literal["fifo", "asha"] = Field(
        default="fifo",
        description="fifo: every trial runs to the end; asha: stop poor trials early (one rung per epoch)",
    )
    num_samples: int = Field(default=8, ge=1, description="configurations sampled (grid: ignored, one pass)")
    max_concurrent: int = Field(default=1, ge=1, description="configurations trained at the same time")
    seeds: list[int] = Field(
        default=[0],
        min_length=1,
        description="every configuration (and each fixed arm) is trained on each of these",
    )
    baseline: bool = Field(
        default=False, description="also train the standard loss on the same seeds (the baseline arm)"
    )
    confirmatory: bool = Field(
        default=False,
        description=(
            "also train the spec's own loss section (e.g. the paper's defaults) on the same seeds, outside "
            "the searcher: a pre-registered arm judged against the baseline without selection"
        ),
    )
    arms: dict[str, LossSpec] = Field(
        default_factory=dict,
        description=(
            "name -> a loss section (its kind, then any option of loss, defaulting as there): more arms trained on the same seeds "
            "and judged against the baseline beside the confirmatory one, the family-wise error controlled "
            "across them (Bonferroni) and the arms ranked; needs baseline"
        ),
    )
    confirm_best: bool = Field(
        default=True,
        description=(
            "with baseline and a non-empty space: after the search, train the best configuration and the "
            "baseline again on as many fresh seeds as search.seeds (the integers after its largest), and "
            "judge best vs baseline on those; the same-seed table stays, labelled exploratory; with "
            "evidence.target_halfwidth, more fresh seeds in rounds until that comparison's interval is so "
            "narrow (at most evidence.max_seeds fresh seeds)"
        ),
    )
    grace_period: int = Field(
        default=1,
        ge=1,
        description="ASHA: epochs every trial trains before it can be stopped (<= train.epochs)",
    )
    reduction_factor: float = Field(
        default=2.0, gt=1.0, description="ASHA: 1/reduction_factor of the trials at a rung go on to the next"
    )

    @field_validator("space")
    @classmethod
    def _entries(cls, space: dict[str, SpaceEntry]) -> dict[str, SpaceEntry]:
        for param, entry in space.items():
            try:
                resolve_param_path(param)
            except KeyError as e:
                raise ValueError(f"{param}: {e.args[0]}") from None
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"{param}: must have exactly one of uniform, loguniform, choice, grid")
            ((kind, values),) = entry.items()
            if kind in ("uniform", "loguniform"):
                if len(values) != 2 or not all(_is_number(v) for v in values):
                    raise ValueError(f"{param}.{kind}: must be [lo, hi] numbers, got {values}")
                lo, hi = values
                if not lo < hi:
                    raise ValueError(f"{param}.{kind}: lo must be < hi, got [{lo}, {hi}]")
                if kind == "loguniform" and lo <= 0:
                    raise ValueError(f"{param}.loguniform: lo must be > 0, got {lo}")
            elif kind in ("choice", "grid"):
                if not values:
                    raise ValueError(f"{param}.{kind}: must be a non-empty list, got {values!r}")
            else:
                raise ValueError(f"{param}: unknown entry {kind!r}; use uniform, loguniform, choice or grid")
        return space

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, LossSpec]) -> dict[str, LossSpec]:
        for name in arms:
            if not ARM_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r}: an arm's name is lower-case letters, digits and _ (at most 40, a letter first)"
                )
            if name in RESERVED_ARMS:
                raise ValueError(f"{name!r}: names another arm of the comparison; choose another name")
            if "kind" not in arms[name].model_fields_set:
                raise ValueError(
                    f"{name}.kind: an arm names its kind (standard, harmonic, harmonicdet or pisa); its other "
                    "options default as in loss"
                )
        return arms

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _empty_space_compares(self) -> SearchSpec:
        if not self.space and not self.confirmatory and not self.arms:
            raise ValueError(
                "space: must name at least one parameter (an empty space needs confirmatory: true or arms, "
                "to compare losses with the baseline without a search)"
            )
        if self.arms and not self.baseline:
            raise ValueError("arms: each arm is judged against the baseline; set baseline: true")
        return self

    def compared_arms(self) -> list[str]:
        """The arms judged against the baseline, one family: ``confirmatory`` (when asked), then ``arms``."""
        return [*(["confirmatory"] if self.confirmatory else []), *self.arms]

    @model_validator(mode="after")
    def _grid_needs_grid(self) -> SearchSpec:
        if self.algorithm == "grid":
            sampled = [
                (p, next(iter(e)))
                for p, e in self.space.items()
                if next(iter(e)) in ("uniform", "loguniform")
            ]
            if sampled:
                (name, kind), more = sampled[0], [p for p, _ in sampled[1:]]
                also = f" (nor {', '.join(more)})" if more else ""
                raise ValueError(
                    f"space.{name}: algorithm grid cannot sample a {kind} range{also}; use grid or choice entries"
                )
        return self


#: Spec paths a search may not vary (``train.seed``: the seeds are ``search.seeds``).
NOT_SEARCHABLE = ("name", "search", "tracking", "train.seed", "scaling")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def search_space_problems(spec: Spec) -> list[tuple[str, str]]:
    """Every reason ``spec``'s ``search.space`` cannot run, as ``(field path, message)`` pairs.

    The rules a Tune trial would otherwise meet late: the path is a searchable spec field, no path
    is listed twice (``alpha`` and ``loss.alpha``), and every value a trial can get gives a valid
    spec: each listed value of ``choice``/``grid``, and for a range both bounds and a point between
    them that is no integer (an integer field cannot be sampled). The structure of each entry is
    checked by :class:`SearchSpec`; this needs the whole spec, so :meth:`Spec.parse` runs it.
    """
    if spec.search is None:
        return []
    problems, paths = _space_path_problems(spec.search.space)
    base = spec.model_copy(update={"search": None})
    for name, path in paths.items():
        ((kind, values),) = spec.search.space[name].items()
        if kind in ("uniform", "loguniform"):
            lo, hi = float(values[0]), float(values[1])
            values = [lo, round(lo + 0.37 * (hi - lo), 6), hi]
        for v in values:
            try:
                base.with_overrides({path: v}, check_paths=False)
            except SpecError as e:
                why = "; ".join(f"{p}: {m}" if p else m for p, m in e.problems)
                problems.append((f"search.space.{name}.{kind}", f"value {v!r} gives an invalid spec ({why})"))
                break
    return problems


def _space_path_problems(space: Any) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The problems of the names of a search space (no such field, not searchable, listed twice),
    and the spec path of every name without one."""
    problems: list[tuple[str, str]] = []
    paths: dict[str, str] = {}
    if not isinstance(space, dict):
        return problems, paths
    for name in space:
        where = f"search.space.{name}"
        try:
            path = resolve_param_path(str(name))
        except KeyError as e:
            problems.append((where, str(e.args[0])))
            continue
        if any(path == p or path.startswith(p + ".") for p in NOT_SEARCHABLE):
            hint = " (seeds are set by search.seeds)" if path == "train.seed" else ""
            problems.append((where, f"{path} cannot be searched{hint}"))
            continue
        twin = next((n for n, q in paths.items() if q == path), None)
        if twin is not None:
            problems.append((where, f"{path} is listed twice (also as {twin})"))
            continue
        paths[name] = path
    return problems, paths


# Spec sections whose fields a bare search-space name may refer to, in lookup order.
_BARE_SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("loss", LossSpec),
    ("train", TrainSpec),
    ("detector", DetectorSpec),
)


def resolve_param_path(name: str) -> str:
    """The dotted spec path of a search parameter: ``alpha`` -> ``loss.alpha``, ``lr`` -> ``train.lr``.

    Dotted names are checked against the spec's sections. Raises ``KeyError`` with a message for
    a name that is no spec field.
    """
    if "." in name:
        from workers.spec.model import Spec

        parts = name.split(".")
        model: type[BaseModel] = Spec
        for i, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                raise KeyError(f"{'.'.join(parts[: i + 1])} is not a spec field")
            ann = field.annotation
            sub = next(
                (
                    a
                    for a in getattr(ann, "__args__", (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)
                ),
                None,
            )
            if i < len(parts) - 1:
                if sub is None:
                    raise KeyError(f"{'.'.join(parts[: i + 1])} has no sub-fields")
                model = sub
        return name
    for section, model in _BARE_SECTIONS:
        if name in model.model_fields:
            return f"{section}.{name}"
    raise KeyError(f"{name!r} is not a field of loss, train or detector; use a dotted path such as train.lr")
