"""Helpers the HTTP job tests share: npz bodies, uploads, and waiting on a job record."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import httpx
import numpy as np


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """``numpy.savez`` of ``arrays`` as bytes."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def upload(client: httpx.Client, headers: dict, url: str, name: str, data: bytes) -> str:
    """POSTs a file to ``url`` (``/v1/models`` or ``/v1/datasets``) and returns the new id."""
    r = client.post(url, files={"file": (name, data)}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def is_final(job: dict) -> bool:
    """Whether a job record reached a final status."""
    return job["status"] in ("succeeded", "failed", "cancelled")


def wait_job(
    client: httpx.Client, headers: dict, job_id: str, until: Callable[[dict], bool] = is_final, timeout_s: float = 300
) -> dict:
    """Polls ``GET /v1/jobs/{id}`` until ``until(job)``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
