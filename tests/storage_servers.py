"""Real storage servers for the snapshot store tests: SeaweedFS (S3), OpenSSH (SFTP) and wsgidav
(WebDAV). Each listens on 127.0.0.1 and free ports, keeps its files in a temp dir, and is
stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from servers import free_port, wait_port

BIN = Path(sys.executable).parent


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


class _Process:
    """A server subprocess whose output goes to a log file in its temp dir."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self.proc

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    grace = 10.0  # seconds between SIGTERM and SIGKILL

    def stop(self) -> None:
        _stop(self.proc, self.grace)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


class SeaweedFS(_Process):
    """``weed server`` with its S3 gateway; every port is named so instances never collide."""

    def __init__(self, workdir: Path, identities: dict[str, list[str]] | None = None) -> None:
        """``identities``: name -> SeaweedFS actions (``Read``, ``List``, ``Write``,
        ``Admin``…) of extra credentials, each with access key = name and secret = name +
        ``-secret``; with any, the gateway enforces them (the default key stays Admin)."""
        super().__init__(workdir, "weed")
        self.grace = 2.0  # its data is throw-away; weed can take 10 s to shut down
        self.s3_port = free_port()
        self.access_key = "harmonylite"
        self.secret_key = "seaweed-secret-key"
        self.identities = identities or {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def args(self) -> list[str]:
        ports = {name: free_port() for name in (
            "master.port", "volume.port", "filer.port", "master.port.grpc", "volume.port.grpc",
            "filer.port.grpc", "s3.port.grpc", "metricsPort")}
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        weed = str(BIN / "weed") if (BIN / "weed").exists() else (shutil.which("weed") or "weed")
        auth = []
        if self.identities:
            ids = [{"name": self.access_key, "actions": ["Admin", "Read", "List", "Write"],
                    "credentials": [{"accessKey": self.access_key,
                                     "secretKey": self.secret_key}]}]
            ids += [{"name": n, "actions": acts,
                     "credentials": [{"accessKey": n, "secretKey": f"{n}-secret"}]}
                    for n, acts in self.identities.items()]
            conf = self.workdir / "s3.json"
            conf.write_text(json.dumps({"identities": ids}))
            auth = [f"-s3.config={conf}"]
        return [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
                "-s3", f"-s3.port={self.s3_port}", *auth,
                *(f"-{name}={port}" for name, port in ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=64", "-volume.max=8"]

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=2, read_timeout=10),
        )

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        proc = self._spawn(self.args())
        wait_port(self.s3_port, timeout=timeout, proc=proc)
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:  # ready when a list_buckets round trip succeeds
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)
        return self

    def create_bucket(self, name: str, timeout: float = 30.0) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:  # the first write may wait for a volume to be allocated
            try:
                client.create_bucket(Bucket=name)
                client.put_object(Bucket=name, Key=".ready", Body=b"")
                client.delete_object(Bucket=name, Key=".ready")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def ssh_keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)],
                   check=True, stdout=subprocess.DEVNULL)
    return path


class SSHD(_Process):
    """OpenSSH's sshd with its own config, a temp host key and root login by key only."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "sshd")
        self.port = free_port()
        self.host_key = ssh_keygen(workdir / "host_ed25519")
        self.client_key = ssh_keygen(workdir / "client_ed25519")
        self.authorized_keys = workdir / "authorized_keys"
        shutil.copy(workdir / "client_ed25519.pub", self.authorized_keys)
        self.known_hosts = workdir / "known_hosts"
        pub = (workdir / "host_ed25519.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.config = workdir / "sshd_config"
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "StrictModes no",
            "UsePAM no",
            "Subsystem sftp internal-sftp",
            "LogLevel INFO",
            "",
        ]))

    def start(self) -> SSHD:
        sshd = "/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else shutil.which("sshd")
        if not sshd:
            raise RuntimeError("sshd not found (apt-get install -y openssh-server)")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        proc = self._spawn([sshd, "-D", "-e", "-f", str(self.config)])
        wait_port(self.port, proc=proc)
        return self


class WsgiDAV(_Process):
    """wsgidav (cheroot) serving a temp dir at / with one user and password (basic auth)."""

    def __init__(self, workdir: Path, user: str = "dav", password: str = "dav-secret-pw") -> None:
        super().__init__(workdir, "wsgidav")
        self.port = free_port()
        self.user = user
        self.password = password
        self.root = workdir / "root"
        self.root.mkdir(exist_ok=True)
        self.config = workdir / "wsgidav.json"
        self.config.write_text(json.dumps({
            "host": "127.0.0.1",
            "port": self.port,
            "server": "cheroot",
            "provider_mapping": {"/": str(self.root)},
            "http_authenticator": {
                "accept_basic": True, "accept_digest": False, "default_to_digest": False,
                "trusted_auth_header": None,
            },
            "simple_dc": {"user_mapping": {"*": {user: {"password": password}}}},
            "verbose": 1,
            "logging": {"enable": False},
            "lock_storage": True,
            "property_manager": True,
        }))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WsgiDAV:
        exe = BIN / "wsgidav"
        args = [str(exe)] if exe.exists() else [sys.executable, "-m", "wsgidav.server.server_cli"]
        proc = self._spawn([*args, f"--config={self.config}"])
        wait_port(self.port, proc=proc)
        return self
