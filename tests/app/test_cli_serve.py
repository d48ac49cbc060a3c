"""`kronlap serve`: a busy port fails at once (before the example is prepared), and the example made with API
keys configured belongs to the first key's tenant, so the printed curl works with that key."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

KEY_A = "team-a-key-" + "a" * 24
KEY_B = "team-b-key-" + "b" * 24


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONLAP_")}
    env.update(KRONLAP_DATA_DIR=str(data_dir), KRONLAP_REDIS_NAMESPACE="kltest-cli-serve", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_a_busy_port_fails_before_anything_slow_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "serve", "--example", "--port", str(port)],
            env=_env(tmp_path / "data"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
    assert "example" not in proc.stdout and "embedded mode" not in proc.stdout
    assert not (tmp_path / "data" / "redis.db").exists()  # no private Redis was started either
    assert elapsed < 60


@pytest.mark.slow
def test_the_example_belongs_to_the_first_keys_tenant(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _env(tmp_path / "data", KRONLAP_API_KEYS=f"team-a:{KEY_A},team-b:{KEY_B}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--example", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 600
        while not (lines and lines[-1].lstrip().startswith("-d ")):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        text = "".join(lines)
        assert "tenant 'team-a'" in text, text
        curl = text[text.index("curl ") :]
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/models/example/predict"
        body = {"inputs": [[0.0] * 784]}
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "example", r.text
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=60).status_code == 404
        if shutil.which("curl"):
            run = subprocess.run(
                ["bash", "-c", curl], env={**os.environ, "KRONLAP_API_KEY": KEY_A}, capture_output=True, text=True
            )
            assert '"model":"example"' in run.stdout, (curl, run.stdout, run.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
