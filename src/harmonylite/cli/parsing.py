"""What every command shares: its place in the one argument tree, its usage errors, and the
database it works on."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from harmonylite.errors import HarmonyliteError, UsageError

if TYPE_CHECKING:
    from harmonylite.config import Config

class CommandParser(argparse.ArgumentParser):
    """Every parser of the tree (``harmonylite``, ``harmonylite snapshot``, ``harmonylite
    snapshot save``): a usage error raises UsageError (exit 2), prefixed ``COMMAND: `` below the
    top (argparse names each parser's ``prog`` after its place in the tree)."""

    def error(self, message: str) -> NoReturn:
        words = self.prog.split()
        raise UsageError(f"{words[1]}: {message}" if len(words) > 1 else message)


# The subcommands of a parser; a command's handler takes the configuration and the parsed words
# (``args.verb`` and its flags).
if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[CommandParser]
else:
    Commands = argparse._SubParsersAction
Handler = Callable[["Config", argparse.Namespace], int]


def add_command(commands: Commands, name: str, *, summary: str, description: str,
                handler: Handler) -> CommandParser:
    """The parser of ``harmonylite NAME``: ``summary`` in the top-level help and docs/cli.md,
    ``description`` in its own --help; ``handler`` runs it."""
    parser = commands.add_parser(name, help=summary, description=description, allow_abbrev=False)
    parser.set_defaults(handler=handler)
    return parser


def add_verbs(parser: CommandParser) -> Commands:
    """A command's verbs (``snapshot save``, ``snapshot list``): one is required."""
    return parser.add_subparsers(dest="verb", required=True, metavar="VERB")


def parse(parser: CommandParser, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed; words left over are a usage error naming the command they followed."""
    args, extra = parser.parse_known_args(list(argv))
    if extra:
        message = "unrecognized arguments: " + " ".join(extra)
        command = getattr(args, "command", None)
        raise UsageError(f"{command}: {message}" if command else message)
    return args


def command_tree(add_parser: Callable[[Commands], Any]) -> CommandParser:
    """A tree of one command, for running a command from its own words (tests, a script):
    ``parse(command_tree(snapshot.add_parser), ["snapshot", "list"])``."""
    root = CommandParser(prog="harmonylite", allow_abbrev=False)
    add_parser(root.add_subparsers(dest="command", required=True))
    return root


def existing_database(db_path: str) -> Path:
    """The database file a command reads or changes; an error names it when it is missing."""
    if not db_path or not Path(db_path).exists():
        raise HarmonyliteError(f"database file {db_path or '(db_path not set)'} does not exist")
    return Path(db_path)
