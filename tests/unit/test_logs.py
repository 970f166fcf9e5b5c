from __future__ import annotations

import json
import logging

import pytest

from harmonylite.ops.logs import ConsoleFormatter, JsonFormatter, setup_logging


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("harmonylite.x", logging.WARNING, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_time_level_message_node_and_fields() -> None:
    line = JsonFormatter().format(record("Snapshot saved", node_id=7, id="abc", db_bytes=10))
    obj = json.loads(line)
    assert obj["message"] == "Snapshot saved"
    assert obj["level"] == "warning"
    assert obj["node_id"] == 7
    assert obj["id"] == "abc" and obj["db_bytes"] == 10
    assert obj["time"].endswith("Z")


def test_console_line_is_readable_and_uncoloured_off_a_terminal() -> None:
    line = ConsoleFormatter(colour=False).format(record("Became snapshot leader", node_id=3,
                                                        lease_rev=5))
    assert "[node 3] Became snapshot leader lease_rev=5" in line
    assert "\x1b[" not in line


def test_setup_logging_stamps_node_id_and_verbose_adds_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging(42, "json", verbose=True)
    logging.getLogger("harmonylite.t").debug("hello %s", "there")
    obj = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert obj["node_id"] == 42 and obj["message"] == "hello there" and obj["level"] == "debug"
    setup_logging(42, "console", verbose=False)
    logging.getLogger("harmonylite.t").debug("hidden")
    assert "hidden" not in capsys.readouterr().err
