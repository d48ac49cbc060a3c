"""Load test: 32 concurrent clients for 60 s against ``kronlap serve --example``, 16 inputs per request, K = 100.

The server (embedded Redis and worker; the example fit cached under ``bench/cache/serve-data`` as for
``bench/serve.py``) runs in a child process. After a 10 s warm-up at full concurrency (the posterior is
loaded, its weight samples drawn, the thread pools grown), every client loops on
``POST /v1/models/example/predict`` over one keep-alive connection, alternating JSON and
``application/x-npy`` bodies of 16 MNIST test digits. The server's resident memory is read from
``/proc`` after the warm-up and after the run (a leak shows as growth; the bar is under 5%).

Writes ``bench/results/load.json`` (``requests``, ``errors``, ``p50_ms``, ``p95_ms``, ``p99_ms``,
``throughput_rps``, ``rss_before_mb``, ``rss_after_mb``, plus the setup) and ``load.md``.

Run: ``make bench-load`` (or ``python -m bench.load --seconds 10`` for a short run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import write_report
from bench.serve import Connection, drop_stale_fits, npy_bytes, start_server, wait_ready

CLIENTS = 32
SECONDS = 60.0
INPUTS = 16
SAMPLES = 100
WARMUP_S = 10.0


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def load(port: int, bodies: list[tuple[bytes, str, str]], clients: int, seconds: float) -> dict[str, float]:
    """Runs ``clients`` request loops for ``seconds``; counts errors (non-200 answers or broken connections)."""
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        conn = Connection("127.0.0.1", port)
        i = k
        try:
            while time.perf_counter() < stop_at:
                body, ctype, path = bodies[i % len(bodies)]
                i += 1
                start = time.perf_counter()
                try:
                    status, payload = await conn.post(path, body, ctype)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = Connection("127.0.0.1", port)
                    continue
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append(f"HTTP {status}: {payload[:200]!r}")
        finally:
            conn.close()

    begin = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(clients)))
    elapsed = time.perf_counter() - begin
    ordered = sorted(latencies) or [float("nan")]

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "requests": len(latencies) + sum(1 for e in errors if not e.startswith("HTTP")),
        "errors": len(errors),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "throughput_rps": len(latencies) / elapsed,
        "error_samples": errors[:5],
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the load test and writes the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--port", type=int, default=8792)
    args = parser.parse_args(argv)

    from curvature.data import mnist5k

    x = mnist5k(seed=0, flat=True).test.x[:INPUTS].contiguous().numpy()
    path = "/v1/models/example/predict"
    bodies = [
        (json.dumps({"inputs": x.tolist(), "samples": SAMPLES}).encode(), "application/json", path),
        (npy_bytes(x.astype(np.float32)), "application/x-npy", f"{path}?samples={SAMPLES}"),
    ]
    drop_stale_fits()
    proc = start_server(args.port, batching=True, threads=args.threads)
    try:
        wait_ready(args.port, proc, timeout_s=900)
        # Warm-up at full concurrency: the posterior is loaded, its samples drawn and the thread pools grown.
        warm = asyncio.run(load(args.port, bodies, args.clients, WARMUP_S))
        if warm["errors"]:
            raise RuntimeError(f"warm-up failed: {warm['error_samples']}")
        rss_before = rss_mb(proc.pid)
        stats = asyncio.run(load(args.port, bodies, args.clients, args.seconds))
        time.sleep(1.0)
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    load_avg = os.getloadavg()
    payload = {
        "requests": stats["requests"],
        "errors": stats["errors"],
        "p50_ms": stats["p50_ms"],
        "p95_ms": stats["p95_ms"],
        "p99_ms": stats["p99_ms"],
        "throughput_rps": stats["throughput_rps"],
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "rss_growth": rss_after / rss_before - 1,
        "setup": {
            "clients": args.clients,
            "seconds": args.seconds,
            "inputs_per_request": INPUTS,
            "samples": SAMPLES,
            "bodies": "alternating JSON and application/x-npy",
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "load_average_after": [round(v, 2) for v in load_avg],
        },
        "error_samples": stats["error_samples"],
        "targets": {"errors": 0, "rss_growth": 0.05},
    }
    lines = [
        "# Load test",
        "",
        f"{args.clients} keep-alive clients for {args.seconds:.0f} s against `kronlap serve --example` "
        f"(embedded Redis and worker), {INPUTS} inputs per request, K = {SAMPLES}, JSON and npy bodies "
        f"alternating; {os.cpu_count()} CPUs, {args.threads} torch thread(s) in the server; load average after the "
        f"run {load_avg[0]:.2f}.",
        "",
        "| requests | errors | p50 ms | p95 ms | p99 ms | req/s | RSS before MiB | RSS after MiB | growth |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {stats['requests']} | {stats['errors']} | {stats['p50_ms']:.1f} | {stats['p95_ms']:.1f} | "
        f"{stats['p99_ms']:.1f} | {stats['throughput_rps']:.1f} | {rss_before:.0f} | {rss_after:.0f} | "
        f"{100 * payload['rss_growth']:+.1f}% |",
        "",
        "Targets: 0 errors, RSS growth under 5%.",
    ]
    json_path, md_path = write_report("load", payload, "\n".join(lines))
    print(
        f"{stats['requests']} requests, {stats['errors']} errors, p50 {stats['p50_ms']:.1f} ms, p99 "
        f"{stats['p99_ms']:.1f} ms, {stats['throughput_rps']:.1f} req/s, RSS {rss_before:.0f} -> {rss_after:.0f} MiB; "
        f"wrote {json_path} and {md_path}"
    )
    return 0 if stats["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
