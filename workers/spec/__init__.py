"""The experiment spec: one schema for the REST API, the CLI and the Ray entrypoint.

A spec is a YAML or JSON document with the sections ``name``, ``dataset``, ``detector``,
``loss``, ``train``, ``scaling``, ``search`` (optional), ``evidence`` (optional: the primary metric
and the precision asked for, see :class:`EvidenceSpec`), ``tracking`` and ``pretrain`` (optional:
pretrain the backbone body first, see :class:`PretrainSpec`). Unknown keys are
errors everywhere, and every error names the field it is about, e.g.
``loss.gamma: 1.5 is outside [0, 1] ...``.

The ``loss`` section has exactly the options of :class:`harmonic.config.LossConfig` and is
validated by it, so the ranges live in one place.
"""

from workers.spec.base import SpecError
from workers.spec.cli import check_main, schema_main
from workers.spec.data import DatasetSpec, PretrainSpec
from workers.spec.evidence import PRIMARY_METRICS, EvidenceSpec
from workers.spec.model import Spec
from workers.spec.sections import (
    RUN_REF_PATTERN,
    DetectorSpec,
    EvalSpec,
    LossSpec,
    ScalingSpec,
    TrackingSpec,
    TrainSpec,
    WarmupSpec,
    parse_run_ref,
)
from workers.spec.space import NOT_SEARCHABLE, SearchSpec, resolve_param_path, search_space_problems

__all__ = [
    "NOT_SEARCHABLE",
    "PRIMARY_METRICS",
    "RUN_REF_PATTERN",
    "DatasetSpec",
    "DetectorSpec",
    "EvalSpec",
    "EvidenceSpec",
    "LossSpec",
    "PretrainSpec",
    "ScalingSpec",
    "SearchSpec",
    "Spec",
    "SpecError",
    "TrackingSpec",
    "TrainSpec",
    "WarmupSpec",
    "parse_run_ref",
    "check_main",
    "resolve_param_path",
    "schema_main",
    "search_space_problems",
]
