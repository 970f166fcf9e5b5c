"""`harmonylite --help` names every command, subcommand, flag and exit code; a command's own
--help works without a configuration file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EVERY = (
    "snapshot save", "snapshot list", "snapshot verify", "snapshot restore",
    "dead-letters list", "dead-letters show", "dead-letters retry", "dead-letters drop",
    "schema status", "--cluster", "conflicts list",
    "-config", "-node-id", "-cluster-addr", "-cluster-peers", "-leaf-servers", "-cleanup",
    "-save-snapshot", "-schema-status", "-schema-status-cluster", "-pprof", "-version",
    "--output", "--integrity-check", "--force", "--json", "--all", "shared-settings show",
    "shared-settings apply", "cluster status", "cluster forget", "--watch", "--max-lag",
)


def harmonylite(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harmonylite", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_help_lists_every_command_flag_and_exit_code(tmp_path: Path) -> None:
    out = harmonylite(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    missing = [w for w in EVERY if w not in out.stdout]
    assert not missing, f"--help lacks {missing}:\n{out.stdout}"
    for code in ("0 ", "1 ", "2 ", "75 "):
        assert f"\n  {code}" in out.stdout, out.stdout


def test_a_commands_help_needs_no_configuration(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("this is = not [valid toml\n")
    for command in ("snapshot", "dead-letters", "schema", "conflicts", "shared-settings",
                    "cluster"):
        out = harmonylite(tmp_path, command, "--help")
        assert out.returncode == 0, (command, out.stderr)
        assert f"harmonylite {command}" in out.stdout
