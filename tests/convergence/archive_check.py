"""With the archive on: once the nodes agree, the archive verifies and a point-in-time restore
to a moment after the last change equals what every node holds."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import oracle

if TYPE_CHECKING:
    from nodes import NodeProc

WINDOW = "restorable window: "


def _window_end(node: NodeProc) -> float | None:
    listing = node.cli("snapshot", "list")
    for line in listing.stderr.splitlines():
        if line.startswith(WINDOW) and " .. " in line:
            end = line[len(WINDOW):].split(" .. ")[1].split(" ")[0]
            return datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp()
    return None


def check(node: NodeProc, converged: oracle.Dump, workdir: Path,
          deadline_s: float = 90.0) -> list[oracle.Failure]:
    point = time.time()
    deadline = time.monotonic() + deadline_s
    while (end := _window_end(node)) is None or end < point:
        if time.monotonic() > deadline:
            return [oracle.Failure("archive", f"the archive did not reach {point} "
                                   f"(its window ends at {end})")]
        time.sleep(1.0)  # poll interval; the deadline above bounds the wait
    out: list[oracle.Failure] = []
    verified = node.cli("archive", "verify")
    if verified.returncode != 0:
        out.append(oracle.Failure("archive", "archive verify failed",
                                  verified.stderr.splitlines()[-10:]))
    target = workdir / "point-in-time.db"
    when = datetime.fromtimestamp(point, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    done = node.cli("snapshot", "restore", "--to-time", when, "--output", str(target))
    if done.returncode != 0:
        out.append(oracle.Failure("archive", "the point-in-time restore failed",
                                  done.stderr.splitlines()[-10:]))
    elif oracle.dump(target) != converged:
        got = oracle.dump(target)
        tables = sorted(t for t in set(got) | set(converged) if got.get(t) != converged.get(t))
        out.append(oracle.Failure("archive", "a restore to after the last change differs from "
                                  "the converged nodes", [f"tables {tables}"]))
    return out
