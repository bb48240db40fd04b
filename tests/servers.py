"""Real server processes for tests: `python -m gemma_mlx serve` on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

START_TIMEOUT_S = 240.0  # a busy two-core machine imports and loads slowly
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: list[str] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("the server did not stop within "
                                     f"{STOP_TIMEOUT_S:.0f} s of Ctrl-C") from None
        return self.process.returncode

    def metric(self, name: str) -> float:
        """The sum of a metric's samples in /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=30, headers=self.headers).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    headers: dict[str, str] = field(default_factory=dict)


@contextmanager
def running_server(*args: str, key: str | None = None,
                   env: dict[str, str] | None = None) -> Iterator[Server]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gemma_mlx", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", process,
                    headers={"Authorization": f"Bearer {key}"} if key else {})
    reader = threading.Thread(target=lambda: server.log.extend(process.stderr), daemon=True)
    reader.start()
    try:
        _wait_ready(server)
        yield server
    finally:
        server.stop()
        reader.join(5)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError("the server exited at start:\n" + "".join(server.log))
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server did not answer /health in time:\n" + "".join(server.log))
