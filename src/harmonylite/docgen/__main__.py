"""``python -m harmonylite.docgen [--check] [--root DIR]``: write (or check) the generated
reference pages of the source tree."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harmonylite.docgen.pages import REGENERATE, rendered, stale


def main() -> int:
    default_root = Path(__file__).resolve().parents[3]
    p = argparse.ArgumentParser(prog="python -m harmonylite.docgen", description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 naming each page that differs")
    p.add_argument("--root", type=Path, default=default_root,
                   help=f"the source tree holding docs/ (default {default_root})")
    args = p.parse_args()
    if not (args.root / "docs").is_dir():
        p.error(f"{args.root} has no docs/ directory")
    if args.check:
        differ = stale(args.root)
        for page in differ:
            print(f"{page} differs from the code: run {REGENERATE}", file=sys.stderr)
        return 1 if differ else 0
    for page, text in rendered(args.root).items():
        (args.root / page).write_text(text)
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
