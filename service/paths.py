"""Where the paths of a spec sent to the service may point: under the service's data roots.

A spec that comes through the API is run by the cluster's job, which would expand ``$VARIABLES``
and ``~`` and open whatever the path names. So the service takes every path literally: a ``$`` or a
leading ``~`` is refused, a relative path is placed under the first data root (a dataset split's
``images``/``ann`` under the dataset's root), and the normalised path must lie under a data root
(its real path too, where it exists here, so a symlink cannot lead out). The spec that is stored
and submitted carries the normalised absolute paths, exactly what was checked.

The fields: ``dataset.root``, ``dataset.train|val|test`` (a split name, or ``{images, ann}``),
``pretrain.root``, ``detector.pretrained_backbone`` and ``detector.init_from`` (files, unless
``runs:/`` references, which :func:`run_refs` lists for a check against the service's MLflow).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers.spec import Spec, parse_run_ref

__all__ = ["confine", "run_refs"]

_WEIGHT_FIELDS = ("pretrained_backbone", "init_from")
_SPLITS = ("train", "val", "test")


class _Confiner:
    def __init__(self, roots: Sequence[Path]):
        self.roots = [Path(os.path.normpath(os.path.abspath(r))) for r in roots]
        self.real_roots = [Path(os.path.realpath(r)) for r in self.roots]
        self.problems: list[tuple[str, str]] = []

    def _refuse(self, field: str, message: str) -> None:
        self.problems.append((field, message))

    def place(self, field: str, value: str, base: Path | None = None) -> str | None:
        """``value`` as a normalised absolute path under a data root, or None (a problem recorded)."""
        if "\0" in value:
            self._refuse(field, "a path cannot hold a NUL character")
            return None
        if "$" in value or value.startswith("~"):
            self._refuse(
                field,
                f"{value!r}: a spec sent to the service is taken literally ($VARIABLES and ~ are not "
                f"expanded); give a path under the data roots {self._names()}",
            )
            return None
        given = Path(value)
        path = Path(os.path.normpath(given if given.is_absolute() else (base or self.roots[0]) / given))
        inside = any(path.is_relative_to(r) for r in self.roots)
        if inside and os.path.lexists(path):
            inside = any(Path(os.path.realpath(path)).is_relative_to(r) for r in self.real_roots)
        if not inside:
            self._refuse(field, f"{value!r} is outside the data roots {self._names()}")
            return None
        return str(path)

    def split(self, field: str, ref: Any, root: Path) -> Any:
        """A split as the spec names it: a name stays a name, ``{images, ann}`` paths are placed."""
        if isinstance(ref, dict):
            placed = {k: self.place(f"{field}.{k}", v, root) for k, v in ref.items()}
            return {k: placed[k] if placed[k] is not None else v for k, v in ref.items()}
        names = (
            [ref]
            if isinstance(ref, str)
            else [x for row in ref for x in row]
            if isinstance(ref, list)
            else []
        )
        for name in names:
            if isinstance(name, str) and ("/" in name or "\\" in name or name in (".", "..")):
                self._refuse(
                    field, f"{name!r}: a split is a name, not a path; give {{images, ann}} for others"
                )
        return ref

    def _names(self) -> str:
        return "(" + ", ".join(str(r) for r in self.roots) + ")"


def confine(spec: Spec, roots: Sequence[Path]) -> tuple[Spec, list[tuple[str, str]]]:
    """``spec`` with every path normalised under ``roots``, and the problems of those that are not."""
    c = _Confiner(roots)
    data = spec.to_dict()
    ds = data["dataset"]
    if ds.get("root") is not None:
        ds["root"] = c.place("dataset.root", ds["root"]) or ds["root"]
    if spec.dataset.format != "synthetic":
        root = Path(ds["root"]) if ds.get("root") else c.roots[0]
        for name in _SPLITS:
            if ds.get(name) is not None:
                ds[name] = c.split(f"dataset.{name}", ds[name], root)
    pre = data.get("pretrain")
    if pre and pre.get("root") is not None:
        pre["root"] = c.place("pretrain.root", pre["root"]) or pre["root"]
    det = data["detector"]
    for name in _WEIGHT_FIELDS:
        value = det.get(name)
        if value is not None and not value.startswith("runs:"):
            det[name] = c.place(f"detector.{name}", value) or value
    if c.problems:
        return spec, c.problems
    return Spec.parse(data, source="spec", check_paths=False), []


def run_refs(spec: Spec) -> list[tuple[str, str]]:
    """``(field, run id)`` of every ``runs:/`` reference of ``spec`` (already shaped by the spec)."""
    out = []
    for name in _WEIGHT_FIELDS:
        value = getattr(spec.detector, name)
        if value is not None and value.startswith("runs:"):
            out.append((f"detector.{name}", parse_run_ref(value)[0]))
    return out
