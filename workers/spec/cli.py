"""``hdet spec schema`` and ``hdet spec check``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields as dc_fields

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
            print(f"{where}: ok ({spec.name}: {kind}, {spec.detector.arch}, loss {spec.loss.kind})")
            if args.print:
                print(json.dumps(spec.to_dict(), indent=2))
    return rc


def _loss_fields_match() -> bool:
    """True when :class:`LossSpec` mirrors :class:`LossConfig` field for field (checked by the tests)."""
    return set(LossSpec.model_fields) == {f.name for f in dc_fields(LossConfig)}
