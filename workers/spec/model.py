"""The experiment spec as a whole: sections put together, cross-section rules, parsing from a dict,
a file or a suite of documents, overrides and resolved paths.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

from harmonic.config import LossConfig
from harmonic.loss_parts import loss_problems
from workers.spec.base import _STRICT, SpecError, _expand, _problems
from workers.spec.data import DatasetSpec, PretrainSpec
from workers.spec.evidence import EvidenceSpec
from workers.spec.sections import DetectorSpec, EvalSpec, LossSpec, ScalingSpec, TrackingSpec, TrainSpec
from workers.spec.space import SearchSpec, _space_path_problems, resolve_param_path, search_space_problems

if TYPE_CHECKING:
    from workers.evidence.sequential import Rule


class Spec(BaseModel):
    """An experiment: one training run, or a Tune search when ``search`` is present."""

    model_config = _STRICT

    name: str = Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the experiment's name (letters, digits, . _ -): its parent run in MLflow",
    )
    dataset: DatasetSpec
    detector: DetectorSpec = Field(default_factory=DetectorSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    search: SearchSpec | None = None
    evidence: EvidenceSpec | None = Field(
        default=None,
        description="the primary metric and the precision asked for (absent: AP, on search.seeds)",
    )
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    pretrain: PretrainSpec | None = Field(
        default=None,
        description="pretrain the backbone body first (absent: detector.pretrained_backbone or scratch)",
    )

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str | None = None, check_paths: bool = True) -> Spec:
        """Validate a spec dict; raises :class:`SpecError` naming each bad field."""
        if not isinstance(data, dict):
            raise SpecError([("", f"a spec must be a mapping, got {type(data).__name__}")], source)
        data = _without_unused_debug(data)
        try:
            spec = cls.model_validate(data, context={"check_paths": check_paths})
        except ValidationError as e:
            problems = _problems(e)
            search = data.get("search")
            if isinstance(search, dict):
                # The names of a search space are checked even when another section failed.
                known = {p for p, _ in problems}
                problems += [p for p in _space_path_problems(search.get("space"))[0] if p[0] not in known]
            raise SpecError(problems, source) from None
        problems = search_space_problems(spec)
        if problems:
            raise SpecError(problems, source)
        return spec

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, check_paths: bool = True) -> Spec:
        """Load and validate a YAML (``.yaml``/``.yml``) or JSON spec file."""
        p = Path(path)
        if not p.is_file():
            raise SpecError([("", f"spec file {str(p)!r} does not exist")], str(p))
        docs = _documents(p)
        if len(docs) != 1:
            raise SpecError(
                [("", f"holds {len(docs)} experiments (YAML documents); load it with Spec.suite_from_file")],
                str(p),
            )
        return cls.parse(docs[0], source=str(p), check_paths=check_paths)

    @classmethod
    def suite_from_file(cls, path: str | os.PathLike[str], *, check_paths: bool = True) -> list[Spec]:
        """Load a file of one or more specs (YAML documents separated by ``---``), all validated.

        A suite (e.g. ``configs/evidence-cpu.yaml``: one comparison per detector) is run by
        ``hdet run`` one experiment after the other. Every problem of every document is reported
        at once (paths prefixed ``#N:`` for the N-th document), and names must be distinct.
        """
        p = Path(path)
        docs = _documents(p)
        if not docs:
            raise SpecError([("", "holds no spec")], str(p))
        specs: list[Spec] = []
        problems: list[tuple[str, str]] = []
        for i, data in enumerate(docs, start=1):
            try:
                specs.append(cls.parse(data, source=f"{p}#{i}", check_paths=check_paths))
            except SpecError as e:
                tag = f"#{i}: " if len(docs) > 1 else ""
                problems.extend(
                    (f"{tag}{path}" if path else tag.rstrip(": "), msg) for path, msg in e.problems
                )
        names = [str(d["name"]) for d in docs if isinstance(d, dict) and d.get("name")]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(
                ("name", f"the experiments of a suite need distinct names; repeated: {', '.join(dupes)}")
            )
        if problems:
            raise SpecError(problems, str(p))
        return specs

    def with_overrides(self, overrides: dict[str, Any], *, check_paths: bool = True) -> Spec:
        """A copy with dotted-path values replaced (``{"loss.alpha": 1.2, "train.seed": 1}``), re-validated.

        Bare names (``alpha``, ``lr``) are resolved with :func:`resolve_param_path`.
        """
        data = copy.deepcopy(self.model_dump(mode="json"))
        for key, value in overrides.items():
            path = resolve_param_path(key).split(".")
            node = data
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[path[-1]] = value
        return Spec.parse(data, source="overrides " + ", ".join(map(str, overrides)), check_paths=check_paths)

    def with_resolved_paths(self) -> Spec:
        """A copy whose dataset and pretraining roots are absolute, resolved here, once.

        The driver calls it before anything starts: a Tune trial or a Ray worker runs in a working
        directory of its own, where a relative root (or the synthetic default under ``./.hdet``)
        would point somewhere else.
        """
        update: dict[str, Any] = {
            "dataset": self.dataset.model_copy(update={"root": self.dataset.resolved_root()})
        }
        if self.pretrain is not None and self.pretrain.root is not None:
            root = str(Path(_expand(self.pretrain.root)).resolve())
            update["pretrain"] = self.pretrain.model_copy(update={"root": root})
        return self.model_copy(update=update)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (every default filled in), JSON-serialisable."""
        return self.model_dump(mode="json")

    def loss_config(self) -> LossConfig:
        return self.loss.to_config()

    def pretrain_image_size(self) -> int:
        """The side of the pretraining's images: ``pretrain.image_size``, else ``detector.image_size``."""
        assert self.pretrain is not None
        return self.pretrain.image_size or self.detector.image_size

    @model_validator(mode="after")
    def _pretrain_apart(self) -> Spec:
        """The pretraining never sees the benchmark: another generator seed and root; its result is
        the only backbone file the spec may name; the search cannot change what it was made for."""
        p = self.pretrain
        if p is None:
            return self
        if self.dataset.format == "synthetic":
            from harmonic.data.synth_params import SynthParams

            bench_seed = SynthParams.seed if self.dataset.seed is None else self.dataset.seed
            if p.seed == bench_seed:
                raise ValueError(
                    f"pretrain.seed: {p.seed} is the benchmark dataset's seed (dataset.seed); the "
                    "pretraining must not see the benchmark's images: choose another seed"
                )
        if p.root is not None:
            mine = Path(_expand(p.root)).resolve()
            if mine == Path(self.dataset.resolved_root()):
                raise ValueError(
                    f"pretrain.root: {p.root!r} is the benchmark dataset's root; generate the pretraining "
                    "images elsewhere (or leave it unset)"
                )
        if self.detector.pretrained_backbone is not None:
            from workers.pretrain import is_pretrain_output

            if not is_pretrain_output(self, self.detector.pretrained_backbone):
                raise ValueError(
                    "detector.pretrained_backbone: set together with pretrain; the pretraining produces the "
                    "backbone file, so remove one of them"
                )
        if self.search is not None:
            fixed = [
                k
                for k in self.search.space
                if resolve_param_path(k).startswith("pretrain.")
                or (resolve_param_path(k) == "detector.image_size" and p.image_size is None)
                or resolve_param_path(k) == "detector.backbone"
            ]
            if fixed:
                raise ValueError(
                    f"search.space: {', '.join(fixed)} cannot be searched with a pretrain section (the "
                    "pretraining runs once, before the search, for one backbone and image size)"
                )
        return self

    @model_validator(mode="after")
    def _loss_fits_the_head(self) -> Spec:
        """The loss's parts are ones the detector's head can take (a sigmoid or a softmax head, see
        :mod:`harmonic.loss_parts`)."""
        problems = loss_problems(self.loss.to_config(), self.detector.arch)
        for name, arm in (self.search.arms if self.search is not None else {}).items():
            problems += [
                (f"search.arms.{name}.{path.removeprefix('loss.')}", msg)
                for path, msg in loss_problems(arm.to_config(), self.detector.arch)
            ]
        if problems:
            path, msg = problems[0]
            raise ValueError(f"{path}: {msg}")
        return self

    @model_validator(mode="after")
    def _rounds_need_a_comparison(self) -> Spec:
        """Seeds in rounds extend the baseline and the arms judged against it (the confirmatory arm,
        ``search.arms``), or the confirmation of a search's best configuration: one must be there.
        (A spec without ``search`` is one training, as each seed's own spec is: nothing to extend.)"""
        ev = self.evidence
        if ev is not None and ev.target_halfwidth is not None and self.search is not None:
            confirming = bool(self.search.space) and self.search.confirm_best
            if not (self.search.baseline and (self.search.compared_arms() or confirming)):
                raise ValueError(
                    "evidence.target_halfwidth: seeds in rounds compare the confirmatory arm (or search.arms, "
                    "or a search's best configuration with confirm_best) with the baseline; set "
                    "search.baseline and search.confirmatory to true, or list arms"
                )
            trainings = 1 + len(self.search.compared_arms())
            if ev.max_trainings is not None and ev.max_trainings < trainings * ev.min_seeds:
                raise ValueError(
                    f"evidence.max_trainings: {ev.max_trainings} cannot pay for the first round ({trainings} "
                    f"arms x min_seeds = {trainings * ev.min_seeds}); raise it or lower min_seeds"
                )
        return self

    def design_warnings(self) -> list[str]:
        """What makes the planned comparison unable to decide, whatever the data (printed by ``hdet spec
        check`` and ``hdet run``): fixed seeds so many that the exact Wilcoxon test is used, whose
        smallest possible p (2 / 2^n) is not below each arm's alpha (``alpha / k`` over k arms)."""
        from workers.evidence.paired import WILCOXON_MIN_PAIRS, wilcoxon_min_p

        if self.search is None or not self.search.baseline or not self.search.compared_arms():
            return []
        if self.evidence is not None and self.evidence.target_halfwidth is not None:
            return []  # seeds in rounds: the confidence sequence has no such floor
        n, rule = len(self.search.seeds), self.evidence_rule()
        if n < WILCOXON_MIN_PAIRS or wilcoxon_min_p(n) < rule.alpha:
            return []
        enough = next(m for m in range(n, 64) if wilcoxon_min_p(m) < rule.alpha)
        k = len(self.search.compared_arms())
        each = (
            f"each of the {k} arms' alpha ({rule.alpha * k:g}/{k} = {rule.alpha:.3g})" if k > 1 else "alpha"
        )
        return [
            f"search.seeds: with {n} fixed seeds the exact Wilcoxon test cannot give p below "
            f"{wilcoxon_min_p(n):.3g}, not below {each}: no arm can be called better or worse whatever the "
            f"data; use {WILCOXON_MIN_PAIRS - 1} seeds or fewer (the t-test) or at least {enough}"
        ]

    def evidence_rule(self) -> Rule:
        """The evidence rule of the arms judged against the baseline (:meth:`SearchSpec.compared_arms`):
        Bonferroni over the family (each arm at ``alpha / k``), ``1 + k`` trainings per seed."""
        from workers.evidence.sequential import family_rule

        rule = (self.evidence or EvidenceSpec()).rule()
        return family_rule(rule, len(self.search.compared_arms()) if self.search is not None else 1)

    @model_validator(mode="after")
    def _grace_within_schedule(self) -> Spec:
        if (
            self.search is not None
            and self.search.scheduler == "asha"
            and self.search.grace_period > self.train.epochs
        ):
            raise ValueError(
                f"search.grace_period ({self.search.grace_period}) must be <= train.epochs ({self.train.epochs})"
            )
        return self


def _documents(p: Path) -> list[Any]:
    """The spec documents of a file: one JSON document, or every YAML document of the file."""
    if not p.is_file():
        raise SpecError([("", f"spec file {str(p)!r} does not exist")], str(p))
    text = p.read_text()
    try:
        if p.suffix == ".json":
            return [json.loads(text)]
        import yaml

        return [d for d in yaml.safe_load_all(text) if d is not None]
    except Exception as e:  # yaml/json parse errors: report them as spec errors
        raise SpecError([("", f"cannot parse: {e}")], str(p)) from None


#: what a stored spec dump held in ``train.debug`` when no fault was injected (the section is gone)
_UNUSED_DEBUG = {"crash_rank": None, "crash_after_epoch": 1, "crash_marker": None, "nonfinite_step": None}


def _without_unused_debug(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without a ``train.debug`` that injects nothing, so specs stored before the section was
    removed (records waiting for Ray, resumed searches) still parse; any other value stays an error."""
    train = data.get("train")
    if not isinstance(train, dict) or "debug" not in train:
        return data
    debug = train["debug"]
    if not isinstance(debug, dict) or any(debug.get(k, v) != v for k, v in _UNUSED_DEBUG.items()):
        return data
    if set(debug) - set(_UNUSED_DEBUG):
        return data
    return {**data, "train": {k: v for k, v in train.items() if k != "debug"}}
