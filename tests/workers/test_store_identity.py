"""A worker refuses to run against another artifact store than the API's, whatever its working directory.

The API records its store's id in Redis; a worker started from another directory with a relative
``KRONLAP_DATA_DIR`` (the mistake that used to make it fail every job with "model not found") exits at once
with a message naming both stores, while one whose path resolves to the API's store starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.api.main import create_app
from app.domain.settings import Settings
from tests.conftest import REPO, settings_env


def _worker(settings: object, cwd: Path, data_dir: str, heartbeat: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        **settings_env(settings),
        "KRONLAP_DATA_DIR": data_dir,
        "KRONLAP_WORKER_HEARTBEAT_FILE": str(heartbeat),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "workers"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def test_data_dir_is_absolute() -> None:
    assert Settings(data_dir=Path("relative/store")).data_dir == (Path.cwd() / "relative/store").resolve()


def test_a_worker_on_another_store_refuses_to_start(
    redis_db, tmp_path: Path, make_settings, run_server, tenant_headers
) -> None:
    api_dir, elsewhere = tmp_path / "api", tmp_path / "elsewhere"
    api_dir.mkdir()
    elsewhere.mkdir()
    settings = make_settings(api_dir / "store")
    with run_server(create_app(settings)) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/readyz").status_code == 200
        wrong = _worker(settings, elsewhere, "store", tmp_path / "wrong.heartbeat")
        try:
            out, _ = wrong.communicate(timeout=120)
        finally:
            if wrong.poll() is None:
                wrong.kill()
        text = out.decode(errors="replace")
        assert wrong.returncode == 2, text
        assert "refusing to start" in text and str(elsewhere / "store") in text and str(api_dir / "store") in text
        assert not (tmp_path / "wrong.heartbeat").exists()

        right = _worker(settings, elsewhere, "../api/store", tmp_path / "right.heartbeat")
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "right.heartbeat").exists():
                assert right.poll() is None, right.communicate()[0].decode(errors="replace")
                assert time.monotonic() < deadline, "the worker on the API's store did not start"
                time.sleep(0.05)
        finally:
            right.terminate()
            right.wait(timeout=60)
