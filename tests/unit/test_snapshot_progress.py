"""Progress: plain lines when not a terminal, a redrawn bar on one."""

from __future__ import annotations

import io

from harmonylite.snapshot.progress import NullProgress, Progress, human_bytes


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out)
    assert p.tty is False
    p.stage("copy", 3 * 1024 * 1024)
    p.advance(1024)
    p.stage("upload")
    p.finish("snapshot x saved")
    lines = out.getvalue().splitlines()
    assert lines[0] == "copy (3.0 MiB)"
    assert lines[1] == "upload"
    assert lines[2].startswith("snapshot x saved (")
    assert "\r" not in out.getvalue()


def test_bar_on_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out, tty=True)
    p.stage("compress", 1000)
    p.advance(500)
    p.stage("upload", 10)
    p.advance(10)
    p.finish("done")
    text = out.getvalue()
    assert "\rcompress" in text and "[" in text and "%" in text
    assert "100.0%" in text  # the finished stage is drawn complete
    assert text.endswith("s)\n")


def test_null_progress_and_sizes() -> None:
    n = NullProgress()
    n.stage("x", 1)
    n.advance(1)
    n.finish("y")
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 1024**3) == "5.0 GiB"
