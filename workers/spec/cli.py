"""``hdet spec schema`` and ``hdet spec check``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields as dc_fields
from typing import Any

from harmonic.config import LossConfig
from workers.spec.base import SpecError
from workers.spec.model import Spec
from workers.spec.sections import LossSpec


def schema_main(argv: list[str]) -> int:
    """``hdet spec schema``: print the spec's JSON Schema."""
    parser = argparse.ArgumentParser(
        prog="hdet spec schema", description="Print the experiment spec's JSON Schema."
    )
    parser.add_argument("--indent", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(Spec.model_json_schema(), indent=args.indent))
    return 0


def check_main(argv: list[str]) -> int:
    """``hdet spec check SPEC...``: validate spec files; exit 2 naming each bad field (as ``hdet run`` would)."""
    parser = argparse.ArgumentParser(prog="hdet spec check", description="Validate experiment spec files.")
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    parser.add_argument("--no-paths", action="store_true", help="do not check that dataset paths exist")
    parser.add_argument("--print", action="store_true", help="print the resolved spec")
    args = parser.parse_args(argv)
    rc = 0
    for path in args.specs:
        try:
            suite = Spec.suite_from_file(path, check_paths=not args.no_paths)
        except SpecError as e:
            print(e, file=sys.stderr)
            rc = 2
            continue
        for i, spec in enumerate(suite, start=1):
            where = f"{path}#{i}" if len(suite) > 1 else path
            kind = (
                "search"
                if spec.search and spec.search.space
                else "comparison"
                if spec.search
                else "single run"
            )
            if spec.search and spec.search.arms:
                kind += f" of {len(spec.search.compared_arms())} arms against the baseline"
            print(f"{where}: ok ({spec.name}: {kind}, {spec.detector.arch}, loss {spec.loss.kind})")
            for warning in spec.design_warnings():
                print(f"{where}: warning: {warning}")
            if args.print:
                print(json.dumps(spec.to_dict(), indent=2))
    return rc


def _loss_fields_match() -> bool:
    """True when :class:`LossSpec` mirrors :class:`LossConfig` field for field (checked by the tests)."""
    return set(LossSpec.model_fields) == {f.name for f in dc_fields(LossConfig)}


def _type_of(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        return "section"
    if "enum" in prop:
        return " \\| ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " \\| ".join(_type_of(p, defs) for p in prop["anyOf"])
    t = prop.get("type", "any")
    if t == "array":
        return f"list[{_type_of(prop.get('items', {}), defs)}]"
    if t == "object":
        return "mapping"
    return str(t)


def _sub_ref(prop: dict[str, Any]) -> str | None:
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    for p in prop.get("anyOf", ()):
        if "$ref" in p:
            return str(p["$ref"]).rsplit("/", 1)[-1]
    return None


def option_rows(schema: dict[str, Any] | None = None) -> list[tuple[str, str, str, str]]:
    """``(option, type, default, meaning)`` of every spec field, from the spec's JSON Schema
    (``hdet spec schema``) itself, sections before their fields."""
    schema = schema or Spec.model_json_schema()
    defs = schema.get("$defs", {})
    rows: list[tuple[str, str, str, str]] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        required = set(node.get("required", ()))
        for name, prop in node.get("properties", {}).items():
            path = f"{prefix}{name}"
            ref = _sub_ref(prop)
            sub = defs.get(ref, {}) if ref else {}
            if "default" in prop:
                default = json.dumps(prop["default"])
            elif name in required:
                default = "required"
            elif ref:
                default = "(its defaults)"
            else:
                default = "-"
            meaning = prop.get("description") or sub.get("description", "").split("\n\n")[0]
            kind = _type_of(prop, defs)
            if ref:
                kind = "section" + (" \\| null" if "anyOf" in prop else "")
                if default.startswith("{"):
                    default = "(its defaults)"
            rows.append((path, kind, default, " ".join(meaning.split())))
            if ref:
                walk(sub, path + ".")

    walk(schema, "")
    return rows


def options_markdown() -> str:
    """The option table of the README (``hdet spec options``)."""
    lines = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for path, kind, default, meaning in option_rows():
        cells = [f"`{path}`", kind, f"`{default}`" if default not in ("required", "-") else default, meaning]
        lines.append(
            "| " + " | ".join(c.replace("|", "\\|") if i != 1 else c for i, c in enumerate(cells)) + " |"
        )
    return "\n".join(lines) + "\n"


def options_main(argv: list[str]) -> int:
    """``hdet spec options``: every spec option with its type, default and meaning (Markdown)."""
    argparse.ArgumentParser(
        prog="hdet spec options",
        description="Print every spec option (type, default, meaning) as a Markdown table.",
    ).parse_args(argv)
    print(options_markdown(), end="")
    return 0
