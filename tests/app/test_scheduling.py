"""Fair predict scheduling in the micro-batcher: a large request is cut into chunks by cost, small requests
take turns between its chunks, and with two threads the cut request never holds both."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from app.api.predictor import MicroBatcher, PredictOptions


def _runner(log: list[tuple[str, int]], seconds_per_row: float, lock: threading.Lock):
    def run(x: torch.Tensor, options: PredictOptions) -> dict[str, np.ndarray]:
        with lock:
            log.append(("start", int(x.shape[0])))
        time.sleep(seconds_per_row * x.shape[0])
        with lock:
            log.append(("end", int(x.shape[0])))
        return {"row": x[:, 0].numpy().copy(), "threshold": np.array(0.5)}

    return run


def test_a_cut_request_takes_turns_with_small_ones() -> None:
    log: list[tuple[str, int]] = []
    run = _runner(log, 0.002, threading.Lock())

    async def scenario() -> tuple[dict, list[float]]:
        executor = ThreadPoolExecutor(1)
        batcher = MicroBatcher(run, executor, max_batch=256, max_wait_s=0.0, concurrency=1, chunk_cost=1000)
        big_x = torch.arange(400, dtype=torch.float32).reshape(400, 1)
        opts = PredictOptions(100, "mc", "entropy", None)  # 1000 // 100 = 10 rows per chunk
        big = asyncio.ensure_future(batcher.submit(big_x, opts))
        await asyncio.sleep(0.05)
        waits = []
        for i in range(5):
            start = time.perf_counter()
            out = await batcher.submit(torch.full((1, 1), 1000.0 + i), opts)
            waits.append(time.perf_counter() - start)
            assert out["row"].tolist() == [1000.0 + i]
        result = await big
        batcher.close()
        executor.shutdown()
        return result, waits

    result, waits = asyncio.run(scenario())
    assert result["row"].tolist() == list(range(400))  # reassembled in order
    assert float(result["threshold"]) == 0.5
    sizes = [n for kind, n in log if kind == "start"]
    assert max(sizes) <= 11 and sizes.count(1) >= 1  # chunks of 10 rows; small requests merged or alone
    assert max(waits) < 0.4, waits  # a 10-row chunk is ~20 ms; the whole request ~0.8 s


def test_with_two_threads_a_cut_request_leaves_one_free() -> None:
    log: list[tuple[str, int]] = []
    lock = threading.Lock()
    run = _runner(log, 0.02, lock)

    async def scenario() -> list[float]:
        executor = ThreadPoolExecutor(2)
        batcher = MicroBatcher(run, executor, max_batch=256, max_wait_s=0.0, concurrency=2, chunk_cost=1000)
        opts = PredictOptions(100, "mc", "entropy", None)
        big = asyncio.ensure_future(batcher.submit(torch.zeros(100, 1), opts))
        await asyncio.sleep(0.03)
        waits = []
        for _ in range(5):
            start = time.perf_counter()
            await batcher.submit(torch.ones(1, 1), opts)
            waits.append(time.perf_counter() - start)
        await big
        batcher.close()
        executor.shutdown()
        return waits

    waits = asyncio.run(scenario())
    running, most = 0, 0
    for kind, n in log:
        if n == 10:
            running += 1 if kind == "start" else -1
            most = max(most, running)
    assert most == 1  # chunks of the cut request never ran two at a time
    assert max(waits) < 0.15, waits  # a free thread: no wait for the 200 ms chunk in flight
