"""The manual's relative links: every file and `#anchor` that README.md and docs/*.md point to exists.

The manual is spread over several files; a section that moves or is renamed must not leave a link
behind that leads nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page; repeated headings get -1, -2, … as on GitHub."""
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = anchor = slug(heading)
        n = 0
        while anchor in found:
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


def links(page: Path) -> list[str]:
    """Relative link targets of a page, outside code blocks."""
    targets = LINK.findall(FENCE.sub("", page.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_slug_matches_github() -> None:
    assert slug("spamd protocol (spamc, Exim, thin `classify`)") == "spamd-protocol-spamc-exim-thin-classify"
    assert slug("Configuration (`config.yaml`)") == "configuration-configyaml"
    assert slug("Verdicts, thresholds and the printed grid") == "verdicts-thresholds-and-the-printed-grid"


def test_finds_a_broken_link(tmp_path: Path) -> None:
    """The check itself: a missing file and a missing anchor are both seen."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[a](#title) [b](#nowhere) [c](missing.md) [d](https://x.org)\n```\n[e](f.md)\n```\n"
    )
    assert links(page) == ["#title", "#nowhere", "missing.md"]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
