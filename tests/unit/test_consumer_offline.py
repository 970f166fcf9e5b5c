"""A stream the cluster called offline stays offline for the lease until it is read again."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError

from harmonylite.bus.streams import STREAM_OFFLINE
from harmonylite.replication.consumer import ShardConsumer


class _Nc:
    """The meta leader's stream listing, naming ``missing`` streams."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        self.asked: list[str] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        self.asked.append(subject)
        return SimpleNamespace(data=json.dumps({"total": 1, "missing": self.missing}).encode())


class _Js:
    """stream_info answers with the errors given, in order, then with a head."""

    def __init__(self, *answers: BaseException, missing: list[str] | None = None) -> None:
        self.answers = list(answers)
        self._prefix = "$JS.API"
        self._nc = _Nc(missing or [])

    async def stream_info(self, stream: str) -> Any:
        if self.answers:
            raise self.answers.pop(0)
        return SimpleNamespace(state=SimpleNamespace(last_seq=7))


def _consumer(js: _Js, tmp_path: Path) -> ShardConsumer:
    writer = SimpleNamespace(path=tmp_path / "data.db")
    return ShardConsumer(cast(Any, js), "s-1", "subj.1", cast(Any, writer), cast(Any, None), 0,
                         lambda *_: None)


def test_a_timeout_after_offline_keeps_the_stream_offline_until_it_answers(
        tmp_path: Path) -> None:
    offline = APIError(code=503, err_code=STREAM_OFFLINE, description="stream is offline")
    c = _consumer(_Js(offline, NatsTimeoutError(), NatsTimeoutError()), tmp_path)

    async def run() -> list[bool]:
        seen = []
        for _ in range(4):
            await c._check_head()
            seen.append(c.stream_offline)
        return seen

    # Offline, then two timeouts (what a request to an offline stream may get), then a head.
    assert asyncio.run(run()) == [True, True, True, False]


def test_a_timeout_alone_is_not_offline(tmp_path: Path) -> None:
    js = _Js(NatsTimeoutError(), missing=["other-stream"])
    c = _consumer(js, tmp_path)
    asyncio.run(c._check_head())
    assert js._nc.asked == ["$JS.API.STREAM.LIST"]
    assert c.stream_offline is False


def test_a_timeout_on_a_stream_the_cluster_misses_too_is_offline(tmp_path: Path) -> None:
    # A one-replica stream whose server died: its own requests time out for minutes, while the
    # cluster's listing names it missing at once.
    c = _consumer(_Js(NatsTimeoutError(), NatsTimeoutError(), missing=["s-1"]), tmp_path)

    async def run() -> list[bool]:
        seen = []
        for _ in range(3):
            await c._check_head()
            seen.append(c.stream_offline)
        return seen

    assert asyncio.run(run()) == [True, True, False]
