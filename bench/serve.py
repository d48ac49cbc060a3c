"""Serving benchmark: predict latency and throughput over HTTP against the in-process posterior.

Starts ``kronlap serve --example`` (embedded Redis and worker; the example MNIST MLP and its KFAC fit are
made once and cached under ``bench/cache/serve-data``) twice, with micro-batching on and off, and drives it
with 1, 8 and 32 concurrent keep-alive clients sending batches of 1 (JSON) and 128 (``application/x-npy``)
inputs, 100 MC samples each. The in-process ``post.predict`` of the same posterior is timed in this process
with the same number of torch threads.

Figures (``bench/results/serve.json`` and ``serve.md``):

* ``overhead_batch128``: median HTTP latency of a batch-128 request (npy body, one client) ÷ median
  in-process ``post.predict`` time for the same batch, the two alternated so both see the same machine load
  (target ≤ 1.10); ``overhead_batch128_json`` is the same with a JSON body.
* ``batching_speedup_32``: throughput of 32 concurrent batch-1 clients with micro-batching ÷ without
  (target ≥ 3).
* ``interleave``: p99 latency of 1-input requests (one client, K = 100) while 4096-input × 1000-sample
  requests run (``p99_with_big_ms``), against the same p99 with no large request (``p99_alone_ms``); the
  ``ratio`` of the two (target ≤ 3) shows that large requests are cut into chunks and interleaved.

Run: ``make bench-serve`` (or ``python -m bench.serve --quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.domain.settings import Settings
from bench.common import CACHE_DIR, write_report

DATA_DIR = CACHE_DIR / "serve-data"
SAMPLES = 100
CONCURRENCY = (1, 8, 32)
BATCHES = (1, 128)
BIG_INPUTS = 4096
BIG_SAMPLES = 1000


class Connection:
    """A minimal HTTP/1.1 keep-alive client (cheap enough not to be the bottleneck on a small machine)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """Sends one POST and returns ``(status, body)``."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        assert self.reader is not None
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        """Closes the socket."""
        if self.writer is not None:
            self.writer.close()


def npy_bytes(x: np.ndarray) -> bytes:
    """``np.save`` into bytes."""
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


async def drive(
    port: int, path: str, bodies: list[tuple[bytes, str]], clients: int, min_requests: int, min_seconds: float
) -> dict[str, float]:
    """Runs ``clients`` concurrent request loops; returns latency percentiles and throughput."""
    latencies: list[float] = []
    issued = 0
    stop_at = time.perf_counter() + min_seconds

    async def loop(k: int) -> None:
        nonlocal issued
        conn = Connection("127.0.0.1", port)
        try:
            while issued < min_requests or time.perf_counter() < stop_at:
                issued += 1
                body, ctype = bodies[(k + issued) % len(bodies)]
                start = time.perf_counter()
                status, payload = await conn.post(path, body, ctype)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {payload[:300]!r}")
        finally:
            conn.close()

    begin = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(clients)))
    elapsed = time.perf_counter() - begin
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_ms": 1000 * statistics.fmean(ordered),
        "requests_per_s": len(ordered) / elapsed,
    }


async def interleaved(
    port: int, path: str, body: bytes, content_type: str, post: Any, x: torch.Tensor, pairs: int
) -> tuple[float, float]:
    """Alternates one HTTP request and one in-process ``post.predict`` on the same batch, so that both see
    the same machine load; returns the median seconds of each."""
    conn = Connection("127.0.0.1", port)
    remote: list[float] = []
    local: list[float] = []
    try:
        for _ in range(pairs):
            start = time.perf_counter()
            status, payload = await conn.post(path, body, content_type)
            remote.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {payload[:300]!r}")
            start = time.perf_counter()
            post.predict(x, samples=SAMPLES)
            local.append(time.perf_counter() - start)
    finally:
        conn.close()
    return statistics.median(remote), statistics.median(local)


async def small_latencies(port: int, path: str, body: bytes, until: Any) -> list[float]:
    """One client sending ``body`` back to back until ``until()`` is true; returns each request's seconds."""
    conn = Connection("127.0.0.1", port)
    out: list[float] = []
    try:
        while not until():
            start = time.perf_counter()
            status, payload = await conn.post(path, body, "application/json")
            out.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {payload[:300]!r}")
    finally:
        conn.close()
    return out


def p99_ms(seconds: list[float]) -> float:
    """99th percentile in milliseconds."""
    ordered = sorted(seconds)
    return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def interleave(port: int, small: bytes, big: bytes, alone_s: float, big_requests: int) -> dict[str, float]:
    """p99 of 1-input requests alone, then while ``big_requests`` large requests run one after another."""
    path = "/v1/models/example/predict"
    warm = time.perf_counter() + 2.0  # the predictor is loaded and its weight samples drawn
    await small_latencies(port, path, small, lambda: time.perf_counter() > warm)
    stop_alone = time.perf_counter() + alone_s
    alone = await small_latencies(port, path, small, lambda: time.perf_counter() > stop_alone)
    big_done = asyncio.Event()
    big_seconds: list[float] = []

    async def run_big() -> None:
        conn = Connection("127.0.0.1", port)
        try:
            for _ in range(big_requests):
                start = time.perf_counter()
                status, payload = await conn.post(f"{path}?samples={BIG_SAMPLES}", big, "application/x-npy")
                big_seconds.append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {payload[:300]!r}")
        finally:
            conn.close()
            big_done.set()

    task = asyncio.create_task(run_big())
    await asyncio.sleep(1.0)  # the first chunks are running
    during = await small_latencies(port, path, small, big_done.is_set)
    await task
    result = {
        "p99_alone_ms": p99_ms(alone),
        "p99_with_big_ms": p99_ms(during),
        "ratio": p99_ms(during) / p99_ms(alone),
        "p50_alone_ms": 1000 * statistics.median(alone),
        "p50_with_big_ms": 1000 * statistics.median(during),
        "small_requests_alone": len(alone),
        "small_requests_with_big": len(during),
        "big_request_s": big_seconds,
        "big_inputs": BIG_INPUTS,
        "big_samples": BIG_SAMPLES,
    }
    return result


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Polls ``/readyz`` until the server answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited; see its output above")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def start_server(port: int, batching: bool, threads: int) -> subprocess.Popen:
    """``kronlap serve --example`` in a child process."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KRONLAP_")},
        "KRONLAP_DATA_DIR": str(DATA_DIR),
        "KRONLAP_REDIS_NAMESPACE": "kronlap-bench",
        "KRONLAP_PREDICT_BATCHING": "true" if batching else "false",
        "KRONLAP_PREDICT_MAX_BATCH": "256",
        "KRONLAP_PREDICT_MAX_WAIT_MS": "2",
        "KRONLAP_TORCH_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
    }
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--example", "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])


def load_example_posterior() -> Any:
    """The example posterior from the bench store, loaded as the API loads it (``None`` if absent)."""
    import curvature as cv
    from app.domain.catalog import Catalog
    from app.domain.errors import NotFound
    from app.domain.example import EXAMPLE_MODEL_ID
    from app.domain.modelio import load_model
    from app.domain.store import ArtifactStore

    catalog = Catalog(ArtifactStore(DATA_DIR))
    try:
        model = catalog.get_model(EXAMPLE_MODEL_ID, None)
    except NotFound:
        return None
    fit = catalog.latest_fit(EXAMPLE_MODEL_ID)
    if fit is None:
        return None
    module = load_model(catalog.store.get_blob(model.sha256), model.filename, tuple(model.input_shape)).module
    return cv.LaplacePosterior.from_bytes(catalog.store.get_blob(fit.posterior_sha256), module)


def drop_stale_fits() -> None:
    """Deletes cached example fits this version of the core cannot read, so the server refits."""
    try:
        load_example_posterior()
    except ValueError as exc:
        print(f"cached example fit unreadable ({exc}); refitting")
        for path in (DATA_DIR / "records" / "fits").glob("*.json"):
            path.unlink()


def in_process_times(x1: torch.Tensor, x128: torch.Tensor, repeat: int) -> dict[str, float]:
    """Median seconds of ``post.predict`` on the example posterior."""
    post = load_example_posterior()
    out = {}
    for name, x in (("batch1", x1), ("batch128", x128)):
        post.predict(x, samples=SAMPLES)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            post.predict(x, samples=SAMPLES)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and writes the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server and in-process")
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seconds = 1.0 if args.quick else 4.0
    repeat = 5 if args.quick else 15
    pairs = 8 if args.quick else 30

    from curvature.data import mnist5k

    x_test = mnist5k(seed=0, flat=True).test.x
    x128 = x_test[:128].contiguous()
    singles = [
        (json.dumps({"inputs": [x_test[i].tolist()], "samples": SAMPLES}).encode(), "application/json")
        for i in range(64)
    ]
    batch_npy = [(npy_bytes(x128.numpy()), "application/x-npy")]
    batch_json = [(json.dumps({"inputs": x128.tolist(), "samples": SAMPLES}).encode(), "application/json")]
    path = "/v1/models/example/predict"
    npy_path = f"{path}?samples={SAMPLES}"

    drop_stale_fits()
    runs: dict[str, dict] = {}
    local: dict[str, float] = {}
    overheads: dict[str, dict[str, float]] = {}
    mixed: dict[str, Any] = {}
    for batching in (True, False):
        proc = start_server(args.port, batching, args.threads)
        try:
            wait_ready(args.port, proc, timeout_s=900)
            if not local:  # the server is idle now; time the same posterior in this process
                local = in_process_times(x_test[:1].contiguous(), x128, repeat)
            mode = "batching" if batching else "no_batching"
            # warm up the predictor (first load, lazily built decompositions)
            asyncio.run(drive(args.port, path, singles, 1, 5, 0.0))
            for batch in BATCHES:
                for clients in CONCURRENCY:
                    bodies, target = (singles, path) if batch == 1 else (batch_npy, npy_path)
                    minimum = max(2 * clients, 10 if batch == 1 else 4)
                    stats = asyncio.run(drive(args.port, target, bodies, clients, minimum, seconds))
                    stats["inputs_per_s"] = stats["requests_per_s"] * batch
                    runs[f"{mode}/batch{batch}/clients{clients}"] = stats
                    print(
                        f"{mode:12s} batch {batch:3d} clients {clients:2d}: p50 {stats['p50_ms']:8.2f} ms  "
                        f"p99 {stats['p99_ms']:8.2f} ms  {stats['requests_per_s']:8.1f} req/s",
                        flush=True,
                    )
            if batching:
                post = load_example_posterior()
                post.predict(x128, samples=SAMPLES)
                for name, (body, ctype), target in (
                    ("npy", batch_npy[0], npy_path),
                    ("json", batch_json[0], path),
                ):
                    remote, here = asyncio.run(interleaved(args.port, target, body, ctype, post, x128, pairs))
                    overheads[name] = {"http_ms": 1000 * remote, "in_process_ms": 1000 * here, "ratio": remote / here}
                    print(
                        f"overhead batch 128 ({name}): HTTP {1000 * remote:.2f} ms / in-process "
                        f"{1000 * here:.2f} ms = {remote / here:.3f}",
                        flush=True,
                    )
                small = json.dumps({"inputs": [x_test[0].tolist()], "samples": SAMPLES}).encode()
                big = npy_bytes(x_test[np.arange(BIG_INPUTS) % len(x_test)].numpy())
                mixed = asyncio.run(interleave(args.port, small, big, seconds * 2, 1 if args.quick else 2))
                print(
                    f"interleave: 1-input p99 alone {mixed['p99_alone_ms']:.2f} ms, beside {BIG_INPUTS} x "
                    f"{BIG_SAMPLES} requests {mixed['p99_with_big_ms']:.2f} ms, ratio {mixed['ratio']:.2f} "
                    f"(large requests took {', '.join(f'{t:.1f}' for t in mixed['big_request_s'])} s)",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    overhead = overheads["npy"]["ratio"]
    overhead_json = overheads["json"]["ratio"]
    speedup = (
        runs["batching/batch1/clients32"]["requests_per_s"] / runs["no_batching/batch1/clients32"]["requests_per_s"]
    )
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "predict_threads": Settings.model_fields["predict_threads"].default,
            "predict_chunk_cost": Settings.model_fields["predict_chunk_cost"].default,
        },
        "samples": SAMPLES,
        "model": "example: MNIST-5k MLP 784-256-10, KFAC fit",
        "in_process_ms": {k: 1000 * v for k, v in local.items()},
        "runs": runs,
        "overhead_batch128": overhead,
        "overhead_batch128_json": overhead_json,
        "overhead_detail": overheads,
        "batching_speedup_32": speedup,
        "interleave": mixed,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "targets": {"overhead_batch128": 1.10, "batching_speedup_32": 3.0, "interleave_ratio": 3.0},
    }
    lines = [
        "# Serving benchmark",
        "",
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} torch thread(s) in server and in-process; "
        f"{SAMPLES} MC samples; example MNIST MLP (784-256-10) with a KFAC fit.",
        "",
        f"- **overhead_batch128** (median HTTP latency with an npy body ÷ median in-process `post.predict`, batch "
        f"128, one client, measured alternately): **{overhead:.3f}** (target ≤ 1.10); with a JSON body: "
        f"{overhead_json:.3f}",
        f"- **batching_speedup_32** (32 clients, batch 1, with ÷ without micro-batching): **{speedup:.2f}** "
        "(target ≥ 3)",
        f"- **interleave** (1-input requests, one client, K = {SAMPLES}: p99 beside {BIG_INPUTS}-input × "
        f"{BIG_SAMPLES}-sample requests ÷ p99 alone): **{mixed['ratio']:.2f}** (target ≤ 3): "
        f"{mixed['p99_with_big_ms']:.1f} ms vs {mixed['p99_alone_ms']:.1f} ms; each large request took "
        f"{', '.join(f'{t:.1f}' for t in mixed['big_request_s'])} s",
        f"- in-process `post.predict`: batch 1 {1000 * local['batch1']:.2f} ms, batch 128 "
        f"{1000 * local['batch128']:.2f} ms",
        "",
        "| mode | batch | clients | p50 ms | p99 ms | req/s | inputs/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, stats in runs.items():
        mode, batch, clients = key.split("/")
        inputs = stats["inputs_per_s"]
        lines.append(
            f"| {mode} | {batch.removeprefix('batch')} | {clients.removeprefix('clients')} | {stats['p50_ms']:.2f} | "
            f"{stats['p99_ms']:.2f} | {stats['requests_per_s']:.1f} | {inputs:.0f} |"
        )
    json_path, md_path = write_report("serve", payload, "\n".join(lines))
    print(
        f"overhead_batch128={overhead:.3f} batching_speedup_32={speedup:.2f} interleave_ratio={mixed['ratio']:.2f}; "
        f"wrote {json_path} and {md_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
