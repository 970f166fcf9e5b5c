"""The README's main command runs to completion and shows every step working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_to_completion(tmp_path: Path) -> None:
    # The route ports come from this test process's own block: a port the demo picks by binding
    # 0 and releasing it can be taken by another worker's server before the node binds it.
    ports = ",".join(str(free_port()) for _ in range(4))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--dir",
                          str(tmp_path / "demo"), "--cluster-ports", ports],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.split("== Summary", 1)[1]
    assert "converged" in summary
    assert "snapshot by leader node" in summary
    assert "from snapshot" in summary  # the fourth node was provisioned from it
    assert "corrupted snapshot refused" in summary and "exit 1  ok" in summary
