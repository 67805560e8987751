"""The evidence section: the primary metric named before the run, its level, and the precision asked
for (seeds in rounds until the interval is that narrow; the rule is :mod:`workers.evidence.sequential`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, model_validator

from workers.spec.base import _STRICT

if TYPE_CHECKING:
    from workers.evidence.sequential import Rule

#: metrics a comparison can name as its primary (the compared metrics of workers.summary).
PRIMARY_METRICS = ("AP", "AP50", "AP75", "AP90", "aic")


class EvidenceSpec(BaseModel):
    """How a comparison is judged; absent: the primary is AP and the seeds are ``search.seeds``."""

    model_config = _STRICT

    primary: Literal["AP", "AP50", "AP75", "AP90", "aic"] = Field(
        default="AP",
        description="the metric tested alone at alpha; the others are secondary, Holm-corrected among themselves",
    )
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="level of the primary's test and interval")
    target_halfwidth: float | None = Field(
        default=None,
        gt=0,
        description=(
            "run seeds in rounds until the primary's interval is at most this wide on each side (AP "
            "points, 0-100; aic as measured); null: the fixed seeds of search.seeds"
        ),
    )
    min_seeds: int = Field(default=5, ge=2, description="seeds of the first round (with target_halfwidth)")
    max_seeds: int = Field(default=64, ge=2, description="the most seeds (with target_halfwidth)")
    round_size: int = Field(default=2, ge=1, description="seeds added per round (with target_halfwidth)")
    max_trainings: int | None = Field(
        default=None,
        ge=4,
        description="budget: the most trainings of the compared arms together (2 per seed)",
    )
    equivalence_margin: float | None = Field(
        default=None,
        gt=0,
        description="'equivalent' when the interval lies inside +-this (units of target_halfwidth); null: the target",
    )

    @model_validator(mode="after")
    def _consistent(self) -> EvidenceSpec:
        if self.min_seeds > self.max_seeds:
            raise ValueError(f"min_seeds: {self.min_seeds} must be <= max_seeds ({self.max_seeds})")
        if self.max_trainings is not None and self.max_trainings < 2 * self.min_seeds:
            raise ValueError(
                f"max_trainings: {self.max_trainings} cannot pay for the first round (2 arms x min_seeds "
                f"= {2 * self.min_seeds}); raise it or lower min_seeds"
            )
        if self.target_halfwidth is None and self.max_trainings is not None:
            raise ValueError("max_trainings: needs target_halfwidth (without it the seeds are fixed)")
        return self

    def rule(self) -> Rule:
        """The stopping rule this section plans (the differences in the primary's table units)."""
        from workers.evidence.sequential import Rule

        return Rule(
            alpha=self.alpha,
            target_halfwidth=self.target_halfwidth,
            min_seeds=self.min_seeds,
            max_seeds=self.max_seeds,
            round_size=self.round_size,
            max_trainings=self.max_trainings,
            margin=self.equivalence_margin,
        )
