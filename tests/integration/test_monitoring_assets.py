"""deploy/monitoring: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and they and the Grafana dashboard name only metrics a node exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harmonylite.ops.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool missing (scripts/test.sh installs prometheus)")
# Prometheus's own series the rules may use beside ours.
PROMETHEUS_OWN = {"up"}


def exported() -> set[str]:
    """Every series name a node's /metrics shows (default prefix), histogram parts included."""
    metrics = Metrics()
    metrics.stream_state("s-1", 1, 0)
    metrics.snapshot_duration_seconds.observe(1.0)
    text = metrics.render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def named(expr: str) -> set[str]:
    return set(re.findall(r"\bharmonylite_[a-z_]+\b", expr))


@needs_promtool
def test_rules_check_and_their_unit_tests_pass() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        out = subprocess.run([str(PROMTOOL), *args], cwd=MONITORING, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, (args, out.stdout, out.stderr)


def test_rules_name_only_exported_metrics_and_cover_the_failures() -> None:
    text = (MONITORING / "alerts.yml").read_text()
    exprs = re.findall(r"^\s+expr: (.+)$", text, re.M)
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", text, re.M))
    assert {"HarmonyLiteNodeDown", "HarmonyLiteApplyStalled", "HarmonyLiteStreamGap",
            "HarmonyLiteReplicationBehind", "HarmonyLiteDeadLetters",
            "HarmonyLiteNoSnapshotLeader", "HarmonyLiteSnapshotStale"} <= alerts
    unknown = set().union(*map(named, exprs)) - exported()
    assert not unknown, f"alert rules name metrics no node exports: {unknown}"
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts.test.yml").read_text()))
    assert {"HarmonyLiteNodeDown", "HarmonyLiteSnapshotStale"} <= tested


def test_dashboard_parses_and_names_only_exported_metrics() -> None:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert len(dash["panels"]) >= 10
    used = set().union(*map(named, exprs))
    unknown = used - exported()
    assert not unknown, f"the dashboard names metrics no node exports: {unknown}"
    for name in ("harmonylite_stream_lag_messages", "harmonylite_dead_letters_total",
                 "harmonylite_snapshot_age_seconds", "harmonylite_snapshot_leader"):
        assert name in used
    bare = [e for e in exprs if not named(e) - PROMETHEUS_OWN]
    assert not bare, f"expressions over no harmonylite metric: {bare}"
