"""Which file each generator writes, and the splicing of generated parts into hand-written pages."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from harmonylite.docgen import monitoring_ref
from harmonylite.docgen.cli_ref import cli_md
from harmonylite.docgen.config_ref import configuration_md, example_toml

WHOLE: dict[str, Callable[[], str]] = {
    "docs/cli.md": cli_md,
    "docs/configuration.md": configuration_md,
    "docs/config.example.toml": example_toml,
}
# Pages of hand-written text with generated parts: page -> part name -> generator.
PARTS: dict[str, dict[str, Callable[[], str]]] = {
    "docs/monitoring.md": monitoring_ref.SECTIONS,
}
REGENERATE = "python -m harmonylite.docgen"


def splice(text: str, page: str, parts: dict[str, Callable[[], str]]) -> str:
    for name, render in parts.items():
        pattern = re.compile(rf"(<!-- BEGIN GENERATED {re.escape(name)} [^\n]*-->\n)(.*?)"
                             rf"(<!-- END GENERATED {re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{page} lacks the markers <!-- BEGIN GENERATED {name} … --> and "
                             f"<!-- END GENERATED {name} -->")
        text = pattern.sub(lambda m, r=render: m[1] + r() + "\n" + m[3], text)  # type: ignore[misc]
    return text


def rendered(root: Path) -> dict[str, str]:
    """Every generated page as it should read, by path relative to ``root``."""
    out = {page: render() for page, render in WHOLE.items()}
    for page, parts in PARTS.items():
        out[page] = splice((root / page).read_text(), page, parts)
    return out


def stale(root: Path) -> list[str]:
    """Pages whose committed text differs from what the code generates."""
    return [page for page, text in rendered(root).items()
            if not (root / page).exists() or (root / page).read_text() != text]
