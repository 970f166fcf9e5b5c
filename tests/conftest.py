from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nodes import stop_leftovers
from servers import NatsServer

# Every credential the suite hands to harmonylite (store settings, NATS logins). None of them may
# ever appear in a log line or an error message of harmonylite, in any test.
SECRETS = (
    "seaweed-secret-key",
    "s3-dead-secret-0xC0FFEE",
    "sftp-dead-pass-0xBEEF",
    "dav-secret-pw",
    "pw-Zq81xx",
    "wrong-pw-77",
)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("harmonylite"):
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += " " + repr(record.exc_info[1])
            self.lines.append(text)


@pytest.fixture(scope="session", autouse=True)
def no_credentials_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: grep every harmonylite log (in-process and node processes)."""
    recorder = _Recorder()
    logging.getLogger().addHandler(recorder)
    yield
    logging.getLogger().removeHandler(recorder)
    texts = list(recorder.lines)
    for path in tmp_path_factory.getbasetemp().rglob("node.log"):
        texts.append(path.read_text(errors="replace"))
    leaks = [(s, t[:200]) for t in texts for s in SECRETS if s in t]
    assert not leaks, f"credentials found in harmonylite logs: {leaks}"


# Under pytest-xdist (scripts/test.sh) each worker takes the next test when it is almost out of
# work; a long test handed out last would run alone at the end. So the longest kinds go first:
# the convergence seeds (20-60 s each), then the other real-process tests and the property tests
# (Hypothesis: CPU-bound, up to a minute on a loaded machine), the other unit tests last. The
# order inside a module is kept (the modules sharing one cluster rely on it).
_ORDER = ("tests/convergence/", "tests/integration/", "tests/contract/", "tests/unit/")


def _rank(item: pytest.Item) -> int:
    path = item.path.as_posix()
    rank = next((i for i, d in enumerate(_ORDER) if f"/{d}" in path), len(_ORDER))
    if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        rank = min(rank, 1)
    return rank


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: the order within each kind stays as collected


# Modules whose tests share one cluster (a module-scoped fixture) and run in order, one scenario
# after the other: under pytest-xdist each goes to one worker as a whole. (xdist's own
# ``xdist_group`` mark no longer groups anything under pytest 9.2: pytest-dev/pytest-xdist#1386.)
SHARED_CLUSTER_MODULES = frozenset({
    "tests/integration/test_harmonylite_e2e.py",  # fixed ports and paths: one cluster at a time
    "tests/integration/test_jetstream_cluster.py",
    "tests/integration/test_cluster_status.py",
    "tests/integration/test_replicated_ddl.py",
    "tests/integration/test_cluster_page.py",
    "tests/integration/test_lease_bucket.py",
    "tests/integration/test_point_in_time.py",  # one history shared by its tests
})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With ``-n N`` (``--dist load``): each test to the next free worker, except that the
    modules above go whole to one worker (first, being the longest units)."""
    if config.getvalue("dist") != "load":
        return None  # another --dist asked for explicitly: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class SharedModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_CLUSTER_MODULES else nodeid

    return SharedModulesTogether(config, log)


@pytest.fixture(autouse=True)
def _stop_leftover_nodes() -> Iterator[None]:
    yield
    stop_leftovers()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store").start()
    try:
        yield server
    finally:
        server.stop()
