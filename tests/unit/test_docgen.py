"""The reference pages match the code they are generated from."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from harmonylite.config import Config, parse_config
from harmonylite.docgen import config_keys, config_ref, health_fields
from harmonylite.docgen.pages import REGENERATE, stale

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "harmonylite"


def test_generated_pages_match_the_code() -> None:
    differ = stale(ROOT)
    assert not differ, (f"{', '.join(differ)} differ from the code: run `PYTHONPATH=src "
                        f"{REGENERATE}` and commit the result")


def test_every_configuration_key_is_described_and_nothing_else() -> None:
    real = {k.dotted for k in config_ref.all_keys()}
    assert real - set(config_keys.KEYS) == set(), "keys without a description in config_keys.py"
    assert set(config_keys.KEYS) - real == set(), "descriptions of keys that do not exist"
    assert not [k for k, d in config_keys.KEYS.items() if not d.text]
    sections = {k.section for k in config_ref.all_keys()}
    assert sections <= set(config_keys.SECTIONS)


def test_settings_the_cluster_enforces_are_marked_shared() -> None:
    shared_settings = pytest.importorskip("harmonylite.node.shared_settings")
    enforced = {s.key for s in shared_settings.SHARED}
    assert {k for k in enforced if not config_keys.KEYS[k].shared} == set()


def test_the_example_file_is_all_defaults() -> None:
    import tomllib

    data = tomllib.loads((ROOT / "docs" / "config.example.toml").read_text())
    cfg, warnings = parse_config(data)
    assert warnings == []
    defaults, _ = parse_config({})
    assert cfg == defaults
    assert dataclasses.asdict(cfg) == dataclasses.asdict(defaults)
    assert isinstance(cfg, Config)


def _reasons_in_code() -> list[str]:
    """Each unhealthy reason the code can give, as its f-string's first literal."""
    found = []
    sources = {
        "ops/health.py": r"reasons\.append\(f?\"([^\"]+)\"",
        "node/status.py": r"out\.append\(f?\"([^\"]+)\"",
        "node/supervisor.py": r"out\.append\(f?\"([^\"]+)\"",
        "restore/at_start.py": r"(?:waiting_for = |parts\.waiting\()f?\"([^\"]+)\"",
        "node/daemon.py": r"self\.waiting = f?\"([^\"]+)\"",
        "node/shared_settings.py": r"return \(f\"(\{self\.key\}[^\"]+)\"",
        "bus/connection.py": r"return f\"(NATS unreachable[^\"]+)\"",
    }
    for path, pattern in sources.items():
        text = (SRC / path).read_text()
        if path == "node/status.py":  # only problems(): warnings() are not health reasons
            text = text[text.index("def problems"):text.index("def warnings")]
        found += re.findall(pattern, text)
    return found


def _documented(reason: str) -> bool:
    """Every literal part of the reason (values left out) is in one documented cause."""
    parts = [p.strip(" (:;") for p in re.split(r"\{[^}]*\}", reason)]
    parts = [p for p in parts if p]
    leading = "" if reason.startswith("{") else parts[0]  # a reason may begin with a value
    return any(all(p in cause for p in parts) and cause.startswith(leading)
               for cause, _ in health_fields.CAUSES)


def test_every_unhealthy_reason_is_documented() -> None:
    reasons = _reasons_in_code()
    assert len(reasons) >= 10, reasons
    missing = [r for r in reasons if not _documented(r)]
    assert not missing, f"reasons missing from src/harmonylite/docgen/health_fields.py: {missing}"
