"""The README and the pages of docs/ are true as written.

Every code block marked ``<!-- tested -->`` in README.md or docs/*.md runs in a fresh shell: bash
blocks with ``bash -e`` in a clean environment (no activated venv, no PYTHONPATH) from a scratch
folder that holds the checkout's ``configs`` and ``.venv`` as the pages expect them; Python blocks
run with the project's interpreter there. Only cheap commands are marked.

Besides, the README stays a front page (a size limit, every docs page linked from it), and every
relative link of these pages names a file that exists and, with an anchor, one of its headings.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

#: the README is a front page: what, install, the commands, the ways in, results, links
README_MAX_BYTES = 15_000
#: prose lines (not tables, not code) wrap before this many characters
MAX_PROSE_LINE = 110

BLOCK = re.compile(r"<!-- tested -->\n```(bash|python)\n(.*?)```", re.S)
FENCE = re.compile(r"^ *```.*?^ *```[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks() -> list[tuple[str, str, str]]:
    """(page, kind, code) of every tested block, in page order."""
    return [(_rel(page), m.group(1), m.group(2)) for page in PAGES for m in BLOCK.finditer(page.read_text())]


def _prose(text: str) -> str:
    """The text without fenced blocks and code spans: where links and headings are."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", page.read_text())):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links() -> list[tuple[str, str]]:
    """(page, target) of every relative link."""
    out = []
    for page in PAGES:
        for m in LINK.finditer(_prose(page.read_text())):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                out.append((_rel(page), target))
    return out


def test_the_readme_is_a_front_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move reference to docs/"
    )


def test_the_readme_links_every_docs_page() -> None:
    linked = {target.split("#")[0] for page, target in _links() if page == "README.md"}
    missing = [_rel(p) for p in PAGES[1:] if _rel(p) not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_the_readme_marks_its_newcomer_path() -> None:
    kinds = {(page, kind) for page, kind, _ in _blocks()}
    assert ("README.md", "bash") in kinds
    assert any(kind == "python" for _, kind in kinds)


def test_every_relative_link_points_to_a_file_that_exists() -> None:
    broken = []
    for page, target in _links():
        path, _, anchor = target.partition("#")
        file = (ROOT / page).parent / path if path else ROOT / page
        if not file.exists():
            broken.append(f"{page}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_prose_lines_are_wrapped() -> None:
    long = []
    for page in PAGES:
        for n, line in enumerate(
            FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text()).splitlines()
        ):
            if len(line) > MAX_PROSE_LINE and not line.lstrip().startswith(("|", "<!--")):
                long.append(f"{_rel(page)}:{n + 1} ({len(line)} characters)")
    assert not long, f"prose lines over {MAX_PROSE_LINE} characters:\n" + "\n".join(long)


@pytest.mark.parametrize(
    ("page", "kind", "code"),
    _blocks(),
    ids=[f"{page}-{i}-{kind}" for i, (page, kind, _) in enumerate(_blocks())],
)
def test_tested_block_runs_as_written(page: str, kind: str, code: str, tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HDET_HOME": str(tmp_path / ".hdet"),
        "LANG": "C.UTF-8",
    }
    if kind == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        cmd = [str(venv / "bin" / "python"), "-c", code]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"{page} {kind} block failed:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
