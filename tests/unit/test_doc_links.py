"""Every link of the user documentation leads somewhere, and user pages speak to users."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
USER_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in page.read_text().splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m[1].lower())
            out.add(text.replace(" ", "-"))
    return out


def test_every_relative_link_and_anchor_exists() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                if dest.name == "CONTRIBUTING.md":
                    continue  # written alongside, by the test-suite work
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_user_pages_name_no_tests_commits_or_issues() -> None:
    found = []
    for page in USER_PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            commit = re.search(r"(?<![-\w.])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}"
                               r"(?![-\w])", line)
            if commit or re.search(r"tests/|\btest_\w+|\bissue #?\d+|\bused to\b", line):
                found.append(f"{page.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
