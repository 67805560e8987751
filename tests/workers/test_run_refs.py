"""``runs:/`` references: an artifact path stays inside its run, so a download never leaves
``$HDET_HOME/artifacts/<run_id>/``."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.spec import SpecError, parse_run_ref
from workers.training.weights import fetch_run_artifact


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("runs:/abc123", ("abc123", None)),
        ("runs:/abc123/checkpoint/model.pt", ("abc123", "checkpoint/model.pt")),
        ("runs:/a-b_c/x..y/model.pt", ("a-b_c", "x..y/model.pt")),
    ],
)
def test_a_run_reference_names_its_run_and_artifact(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_run_ref(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "runs:/abc/../../..",
        "runs:/abc/checkpoint/../../x",
        "runs:/abc//etc/passwd",
        "runs:/abc/a\\..\\b",
        "runs:abc",
    ],
)
def test_a_run_reference_that_leaves_its_run_is_refused(ref: str) -> None:
    with pytest.raises(ValueError, match="runs:/"):
        parse_run_ref(ref)


def test_fetching_a_traversing_reference_fails_before_any_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HDET_HOME", str(tmp_path))
    (tmp_path / "secret.pt").write_text("x")  # what ../../secret.pt would reach from the cache
    with pytest.raises(SpecError, match="detector.init_from"):
        fetch_run_artifact(
            "runs:/abc/../../secret.pt", "checkpoint/model.pt", "sqlite:///x.db", "detector.init_from"
        )
