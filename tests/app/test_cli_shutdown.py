"""`kronlap serve` in embedded mode leaves no private Redis behind when it is stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(socket_path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(socket_path)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.mark.slow
def test_sigterm_stops_the_embedded_redis(tmp_path: Path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONLAP_")}
    env["KRONLAP_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "embedded mode" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        match = re.search(r"unix://(\S+?\.socket)", line)
        assert match, line
        redis_socket = match.group(1)
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert _answers(redis_socket)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _answers(redis_socket) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _answers(redis_socket)
    finally:
        if proc.poll() is None:
            proc.kill()
