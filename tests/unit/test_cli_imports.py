"""A snapshot restore starts a fresh process: the command line must not import the code of
commands it does not run (the archive, the applier, the schema registry), which cost a restore
about a tenth of its time."""

from __future__ import annotations

import subprocess
import sys

NOT_FOR_A_RESTORE = (
    "harmonylite.archive.verify",
    "harmonylite.archive.catalog",
    "harmonylite.restore.point_in_time",
    "harmonylite.replication.apply",
    "harmonylite.replication.conflicts",
    "harmonylite.replication.schema_registry",
    "nats",
)


def test_command_line_imports_only_what_a_restore_needs() -> None:
    code = ("import sys, harmonylite.cli.main as m; m.build_parser(); "
            "print('\\n'.join(sorted(sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    loaded = set(res.stdout.split())
    assert "harmonylite.restore.verify" in loaded  # the check itself sees the modules
    assert sorted(m for m in NOT_FOR_A_RESTORE if m in loaded) == []
