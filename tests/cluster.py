"""A three-server JetStream cluster on free ports, for the cluster fault tests and the bench.

Each server can be killed (SIGKILL) and started again on the same ports and store, so a fault
looks to the nodes exactly as a crashed machine that comes back.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import nats

from servers import NatsServer, free_port


class Cluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        self.servers: list[NatsServer] = []
        for i, (client, route) in enumerate(ports):
            others = [r for j, (_, r) in enumerate(ports) if j != i]
            self.servers.append(NatsServer(base / f"s{i}" / "store", client, cluster_port=route,
                                           routes=others, name=f"s{i}"))

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> Cluster:
        for s in self.servers:
            s.start()
        self.wait_ready()
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def kill(self, i: int) -> None:
        self.servers[i].stop(signal.SIGKILL)

    def restart(self, i: int) -> None:
        self.servers[i].start()

    def alive(self) -> list[int]:
        return [i for i, s in enumerate(self.servers) if s.proc is not None]

    def by_name(self, name: str | None) -> int:
        """The index of the server called ``name``; -1 for none (a stream between leaders)."""
        return next((i for i, s in enumerate(self.servers) if s.name == name), -1)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until JetStream answers account info through every live server (a meta leader)."""
        deadline = time.monotonic() + timeout
        for i in self.alive():
            while True:
                try:
                    asyncio.run(self._ask(i, lambda js: js.account_info()))
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    async def _ask(self, i: int, call: Any) -> Any:
        nc = await nats.connect(self.servers[i].url, allow_reconnect=False, connect_timeout=2)
        try:
            return await asyncio.wait_for(call(nc.jetstream(timeout=2)), 5)
        finally:
            await nc.close()

    def ask(self, call: Any) -> Any:
        """``call(js)`` through the first live server that answers it."""
        last: Exception | None = None
        for i in self.alive():
            try:
                return asyncio.run(self._ask(i, call))
            except Exception as exc:
                last = exc
        raise RuntimeError(f"no live server answered: {last}")

    def stream_leader(self, stream: str) -> int:
        info = self.ask(lambda js: js.stream_info(stream))
        return self.by_name(info.cluster.leader)

    def stream_state(self, stream: str) -> Any:
        return self.ask(lambda js: js.stream_info(stream))
