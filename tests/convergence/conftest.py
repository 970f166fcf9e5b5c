from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "convergence: seeded multi-node convergence runs (real processes)")
    config.addinivalue_line(
        "markers", "convergence_known_bug: committed seeds of bugs the checker found; run "
        "with HARMONYLITE_CONVERGENCE_BUGS=1 or -m convergence_known_bug")
