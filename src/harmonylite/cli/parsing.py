"""What every command shares: its parser's usage errors, and the database it works on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from harmonylite.errors import HarmonyliteError, UsageError


def parser_class(command: str) -> type[argparse.ArgumentParser]:
    """An ArgumentParser whose usage errors raise UsageError (exit 2), prefixed ``command: ``
    (nothing for the top-level parser); its subcommands' parsers are made with it too."""

    class CommandParser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise UsageError(f"{command}: {message}" if command else message)

    return CommandParser


def existing_database(db_path: str) -> Path:
    """The database file a command reads or changes; an error names it when it is missing."""
    if not db_path or not Path(db_path).exists():
        raise HarmonyliteError(f"database file {db_path or '(db_path not set)'} does not exist")
    return Path(db_path)
