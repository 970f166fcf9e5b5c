"""The generated tables of docs/monitoring.md: metrics from the registry of
:class:`harmonylite.ops.metrics.Metrics`, health fields and causes from
:mod:`harmonylite.docgen.health_fields`."""

from __future__ import annotations

from typing import Any

from harmonylite.docgen.health_fields import CAUSES, FIELDS
from harmonylite.ops.metrics import Metrics


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def metric_rows(metrics: Metrics | None = None) -> list[tuple[str, str, str, str]]:
    """(name as exposed without the namespace, type, labels, help) of every metric."""
    m = metrics or Metrics(namespace="harmonylite")
    out = []
    for value in vars(m).values():
        if not hasattr(value, "_labelnames") or not hasattr(value, "_type"):
            continue
        metric: Any = value
        name = str(metric._name).removeprefix("harmonylite_")
        kind = str(metric._type)
        if kind == "counter":
            name += "_total"
        out.append((name, kind, ", ".join(metric._labelnames), str(metric._documentation)))
    return out


def metrics_table() -> str:
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {k} | {labels} | {_cell(h)} |" for n, k, labels, h in metric_rows()]
    return "\n".join(lines)


def health_fields_table() -> str:
    lines = ["| field | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in FIELDS.items()]
    return "\n".join(lines)


def health_causes_table() -> str:
    lines = ["| `reasons` holds | when, and what to do |", "|---|---|"]
    lines += [f"| `{_cell(r)} …` | {_cell(w)} |" for r, w in CAUSES]
    return "\n".join(lines)


SECTIONS = {
    "metrics": metrics_table,
    "health-fields": health_fields_table,
    "health-causes": health_causes_table,
}
