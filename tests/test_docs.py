"""The README and the docs: short enough to read, and every link goes somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted(REPO.glob("*/README.md"))]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_readme_stays_short() -> None:
    """The README takes a newcomer from clone to scored slides; the reference is in docs/."""
    assert (REPO / "README.md").stat().st_size < 12_000


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(document: Path) -> None:
    broken = [link for link in _LINK.findall(document.read_text())
              if not re.match(r"[a-z]+:", link) and link.split("#")[0]
              and not (document.parent / link.split("#")[0]).exists()]
    assert broken == [], f"{document.name} links to missing files: {broken}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_documents_name_no_issue_numbers(document: Path) -> None:
    """Docs describe the product; the tracker's numbering means nothing to a user."""
    assert not re.search(r"\bissues? #?\d+", document.read_text(), re.IGNORECASE)
