"""The command line is one argparse tree: every command and verb in it, usage errors naming the
command they belong to, and a command line that needs no NATS not loading its client."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harmonylite.cli.main import build_parser, main, subcommands
from harmonylite.cli.parsing import CommandParser

VERBS = {
    "snapshot": ["save", "list", "verify", "restore"],
    "archive": ["verify"],
    "dead-letters": ["list", "show", "retry", "drop"],
    "schema": ["status"],
    "conflicts": ["list"],
    "cluster": ["status", "forget"],
    "shared-settings": ["show", "apply"],
}


def test_one_tree_holds_every_command_and_verb() -> None:
    found = {}
    for name, command, summary in subcommands(build_parser()):
        assert isinstance(command, CommandParser) and command.prog == f"harmonylite {name}"
        assert summary, name
        found[name] = [verb for verb, parser, _ in subcommands(command)
                       if parser.prog == f"harmonylite {name} {verb}"]
    assert found == VERBS


@pytest.mark.parametrize(("argv", "said"), [
    (["bogus"], "harmonylite: unknown command 'bogus': the commands are 'snapshot', "),
    (["snapshot"], "harmonylite: snapshot: the following arguments are required: VERB"),
    (["snapshot", "bogus"], "harmonylite: snapshot: argument VERB: invalid choice: 'bogus'"),
    (["snapshot", "list", "--bogus"], "harmonylite: snapshot: unrecognized arguments: --bogus"),
    (["snapshot", "list", "-config", "x"],
     "harmonylite: snapshot: unrecognized arguments: -config x"),
    (["dead-letters", "show", "x"], "harmonylite: dead-letters: argument id: invalid int value"),
    (["cluster", "forget"], "harmonylite: cluster: the following arguments are required: N"),
    (["-no-such-flag"], "harmonylite: unrecognized arguments: -no-such-flag"),
])
def test_usage_errors_exit_2_naming_the_command(argv: list[str], said: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert said in capsys.readouterr().err


def test_a_command_line_that_needs_no_nats_does_not_load_its_client() -> None:
    # The whole tree is built for every command line; what talks to NATS is imported by the
    # handlers that use it.
    code = ("import sys; from harmonylite.cli.main import main; "
            "assert main(['-version']) == 0; "
            "assert 'nats' not in sys.modules, 'the NATS client was loaded'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
