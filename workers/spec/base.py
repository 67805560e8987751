"""What every spec section shares: the spec error and its field paths, strict models, path rules."""

from __future__ import annotations

import os
from typing import Any

from pydantic import (
    ConfigDict,
    ValidationError,
    ValidationInfo,
)

from harmonic.config import EvalProtocol, LossConfig

_STRICT = ConfigDict(extra="forbid", validate_default=True)
_DEFAULT_LOSS = LossConfig()
_DEFAULT_EVAL = EvalProtocol()


class SpecError(ValueError):
    """A spec is invalid. ``problems`` lists ``(field path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid spec {source}" if source else "invalid spec"
        lines = [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        super().__init__(head + ":\n" + "\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.problems, self.source))


def _check_paths(info: ValidationInfo) -> bool:
    # The service validates specs for a cluster whose storage it may not see: it passes
    # context={"check_paths": False}. Everything else checks that paths exist.
    ctx = info.context or {}
    return bool(ctx.get("check_paths", True))


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


SplitRef = str | int | dict[str, str] | list[list[str | int]]


def _init_error(err: Any) -> dict[str, Any]:
    """A pydantic error (``ValidationError.errors()``) as the input of ``ValidationError.from_exception_data``."""
    out = {"type": err["type"], "loc": tuple(err["loc"]), "input": err.get("input")}
    if "ctx" in err:
        out["ctx"] = err["ctx"]
    return out


def _problems(e: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        path = ".".join(loc)
        # Validators of a section write "field: message" (and LossConfig "loss.field: message");
        # fold that field into the path so every message starts with the full field path.
        head, sep, rest = msg.partition(": ")
        if sep and head and " " not in head and not head.startswith("["):
            if head.startswith(path + ".") or head == path:
                path, msg = head, rest
            elif path and not head.startswith(loc[0] + "."):
                path, msg = f"{path}.{head}", rest
            elif not path:
                path, msg = head, rest
        problems.append((path, msg))
    return problems
