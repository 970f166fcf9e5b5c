"""Run the marked code blocks of a documentation page on loopback, as if on several machines.

A block's info string says what to do with it (words after the language; GitHub ignores them):

- ```` ```sh on=each ```` runs on every machine, ``on=host2`` on one; ``bg`` starts it in the
  background (one command: a server or a node) instead of waiting for it;
  ``variant=NAME`` restricts it to one variant of the page (``external``, ``embedded``…).
- ```` ```toml file=PATH ```` is a file written on every machine before anything runs.
- ```` ```text output ```` right after a block is what that block prints: each line must be
  found, in order (``…`` matches anything). The block is re-run until it does, as replication
  is asynchronous.

Machine ``hostN`` becomes 127.0.0.1 with its own ports and its own directory: every address,
port and path of the page is rewritten by :meth:`Machine.rewrite`.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
PORTS = {"4222": "client", "6222": "cluster", "8090": "health"}


@dataclass
class Block:
    lang: str
    attrs: dict[str, str]
    body: str
    output: str | None = None

    @property
    def background(self) -> bool:
        return "bg" in self.attrs


def blocks(page: str, variant: str) -> list[Block]:
    out: list[Block] = []
    for m in _BLOCK.finditer(page):
        attrs: dict[str, str] = {}
        for word in m[2].split():
            key, _, value = word.partition("=")
            attrs[key] = value
        block = Block(m[1], attrs, m[3])
        if block.lang == "text" and "output" in attrs and out:
            out[-1].output = block.body
            continue
        if attrs.get("variant", variant) != variant:
            continue
        if "on" in attrs or "file" in attrs:
            out.append(block)
    return out


@dataclass
class Machine:
    n: int
    root: Path
    ports: dict[str, int]
    bin_dir: Path
    cluster: list[Machine] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"host{self.n}"

    def rewrite(self, text: str) -> str:
        """The page's text as it reads on this machine of the loopback cluster."""
        for other in self.cluster:
            for port, kind in PORTS.items():
                text = text.replace(f"{other.name}:{port}", f"127.0.0.1:{other.ports[kind]}")
        for port, kind in PORTS.items():
            text = text.replace(f"0.0.0.0:{port}", f"127.0.0.1:{self.ports[kind]}")
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{self.ports[kind]}")
            text = text.replace(f"-p {port}", f"-p {self.ports[kind]}")
        text = text.replace("-a 0.0.0.0", "-a 127.0.0.1")
        text = text.replace("-n nats-1", f"-n nats-{self.n}")
        text = re.sub(r"^node_id = 1\b", f"node_id = {self.n}", text, flags=re.M)
        text = text.replace("/opt/harmonylite/bin/", f"{self.bin_dir}/")
        for path in ("/var/lib/harmonylite", "/var/lib/nats", "/etc/harmonylite"):
            text = text.replace(path, str(self.root / path.strip("/").replace("/", "-")))
        return text

    def path(self, doc_path: str) -> Path:
        return Path(self.rewrite(doc_path))


def matches(expected: str, actual: str) -> bool:
    """Every expected line is found in ``actual``, in order; ``…`` matches anything."""
    pattern = ".*?".join(
        ".*?".join(re.escape(part) for part in line.split("…"))
        for line in expected.strip().splitlines())
    return re.search(pattern, actual, re.S) is not None


class Runner:
    def __init__(self, machines: list[Machine], env: dict[str, str], log_dir: Path) -> None:
        self.machines = machines
        self.env = env
        self.log_dir = log_dir
        self.background: list[tuple[subprocess.Popen[bytes], Path]] = []

    def on(self, block: Block) -> list[Machine]:
        where = block.attrs.get("on", "each")
        if where == "each":
            return self.machines
        return [m for m in self.machines if m.name == where]

    def start(self, block: Block, machine: Machine) -> None:
        command = machine.rewrite(block.body).strip()
        assert "\n" not in command.replace("\\\n", ""), f"a bg block holds one command: {command}"
        log = self.log_dir / f"{machine.name}-{len(self.background)}.log"
        proc = subprocess.Popen(["bash", "-c", "exec " + command], env=self.env,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.background.append((proc, log))

    def run(self, block: Block, machine: Machine, timeout: float) -> str:
        script = machine.rewrite(block.body)
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(["bash", "-e", "-c", script], env=self.env, capture_output=True,
                                  text=True, timeout=timeout)
            ok = proc.returncode == 0 and (block.output is None
                                          or matches(block.output, proc.stdout))
            if ok:
                return proc.stdout
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"on {machine.name}: {script!r} exited {proc.returncode}\nstdout:\n"
                    f"{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}\nexpected:\n{block.output}"
                    f"\nbackground logs:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}"
                         for _, log in self.background if log.exists())

    def stop(self) -> None:
        # Nodes first (started last), then their servers; each by its own process group id.
        for proc, _ in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def shim(bin_dir: Path, name: str, command: list[str]) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(c) for c in command) + ' "$@"\n')
    path.chmod(0o755)
