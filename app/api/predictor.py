"""Ready posteriors in the API process and micro-batching of concurrent predict requests.

:class:`PredictorPool` keeps an LRU of :class:`Predictor` objects, each a deserialised
``cv.LaplacePosterior`` over its imported network, loaded from the Redis cache or else the artifact store
(and put back in the cache). Loading happens once per fit even under concurrent first requests.

:class:`MicroBatcher` merges concurrent requests with the same options into one ``post.predict`` call, as
Triton's dynamic batcher and Ray Serve's ``@serve.batch`` do: the first request opens a batch, requests
already waiting join it, and the batch waits up to ``max_wait`` for more until it holds ``max_batch``
inputs (it waits only while requests have been arriving concurrently, so a lone client pays no delay).
``post.predict`` runs on a small thread pool so the event loop keeps serving. While all threads are busy, new
requests queue up and form the next, larger batch. Requests carrying an explicit ``seed``
are never merged, so a seeded request returns the same numbers under any load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from app.domain.cache import PosteriorCache
from app.domain.catalog import Catalog, FitRecord, ModelRecord
from app.domain.errors import InternalError
from app.domain.metrics import Metrics
from app.domain.settings import Settings
from curvature.options import Predictive

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
RESOLVE_TTL_S = 2.0


class PredictOptions(NamedTuple):
    """Options that must agree for requests to share a batch."""

    samples: int
    predictive: str
    ood_score: str
    seed: int | None


@dataclass(eq=False)
class _Request:
    x: torch.Tensor
    options: PredictOptions
    future: asyncio.Future[Outputs]

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


class MicroBatcher:
    """Merges concurrent requests into batched calls of ``run``.

    Args:
        run: Blocking function ``(x, options) -> outputs`` (arrays with the batch first), run on ``executor``.
        executor: Thread pool for ``run``.
        max_batch: Most inputs per call.
        max_wait_s: How long an open batch waits for more requests.
        concurrency: Calls allowed in flight at once (the executor's size).
        on_batch: Called with ``(inputs, requests, seconds)`` after every call (metrics).
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor, PredictOptions], Outputs],
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_wait_s: float,
        concurrency: int = 1,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.run = run
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.concurrency = concurrency
        self.on_batch = on_batch
        self._pending: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._last_batch_requests = 0
        self._closing = False

    async def submit(self, x: torch.Tensor, options: PredictOptions) -> Outputs:
        """Queues ``x`` and returns its rows of the batched outputs."""
        loop = asyncio.get_running_loop()
        self._closing = False
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop(), name="kronlap-microbatcher")
        request = _Request(x=x, options=options, future=loop.create_future())
        self._pending.append(request)
        self._wakeup.set()
        return await request.future

    def close(self) -> None:
        """Lets the batching task finish the queued requests, then stop (it restarts on a later submit)."""
        self._closing = True
        self._wakeup.set()

    def _take(self, options: PredictOptions, room: int) -> list[_Request]:
        taken: list[_Request] = []
        keep: deque[_Request] = deque()
        while self._pending:
            request = self._pending.popleft()
            if request.future.done():
                continue
            if request.options == options and request.options.seed is None and request.rows <= room:
                taken.append(request)
                room -= request.rows
            else:
                keep.append(request)
        self._pending = keep
        return taken

    async def _next_batch(self) -> list[_Request] | None:
        while True:
            while not self._pending:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending.popleft()
            if not first.future.done():
                break
        batch = [first]
        if first.options.seed is not None:
            return batch
        rows = first.rows
        loop = asyncio.get_running_loop()
        # Wait for company only when requests have been arriving concurrently; a lone client pays nothing.
        wait_s = self.max_wait_s if self._last_batch_requests > 1 or self._pending else 0.0
        deadline = loop.time() + wait_s
        while rows < self.max_batch:
            more = self._take(first.options, self.max_batch - rows)
            batch += more
            rows += sum(r.rows for r in more)
            remaining = deadline - loop.time()
            if rows >= self.max_batch or remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                batch += self._take(first.options, self.max_batch - rows)
                break
        return batch

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if batch is None:
                self._slots.release()
                self._closing = False
                return
            self._last_batch_requests = len(batch)
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _execute(self, batch: list[_Request]) -> None:
        try:
            x = batch[0].x if len(batch) == 1 else torch.cat([r.x for r in batch])
            start = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                outputs = await loop.run_in_executor(self.executor, self.run, x, batch[0].options)
            except Exception as exc:
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                return
            if self.on_batch is not None:
                self.on_batch(int(x.shape[0]), len(batch), time.perf_counter() - start)
            rows = int(x.shape[0])
            offset = 0
            for request in batch:
                end = offset + request.rows
                if not request.future.done():
                    request.future.set_result(
                        {k: v[offset:end] if v.ndim and v.shape[0] == rows else v for k, v in outputs.items()}
                    )
                offset = end
        finally:
            self._slots.release()


@dataclass(eq=False)
class Predictor:
    """A posterior ready to answer predict requests.

    Attributes:
        model: The model's record.
        fit: The fit's record.
        posterior: The deserialised ``cv.LaplacePosterior``.
        batcher: Micro-batcher, or ``None`` when batching is off.
    """

    model: ModelRecord
    fit: FitRecord
    posterior: Any
    executor: ThreadPoolExecutor
    batcher: MicroBatcher | None = None

    def compute(self, x: torch.Tensor, options: PredictOptions) -> Outputs:
        """Blocking call of ``post.predict``; returns numpy arrays."""
        out = self.posterior.predict(
            x, samples=options.samples, predictive=options.predictive, ood_score=options.ood_score, seed=options.seed
        )
        return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in out.items()}

    async def predict(self, x: torch.Tensor, options: PredictOptions) -> Outputs:
        """Predicts for ``x``, through the micro-batcher when there is one."""
        if self.batcher is not None:
            return await self.batcher.submit(x, options)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.compute, x, options)


class PredictorPool:
    """LRU of :class:`Predictor` objects keyed by fit id.

    Args:
        settings: Batching and cache-size settings.
        catalog: Records and blobs.
        cache: Redis posterior cache.
        metrics: Metrics sink.
    """

    def __init__(self, settings: Settings, catalog: Catalog, cache: PosteriorCache, metrics: Metrics) -> None:
        self.settings = settings
        self.catalog = catalog
        self.cache = cache
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(settings.predict_threads, thread_name_prefix="kronlap-predict")
        self._entries: OrderedDict[str, Predictor] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Predictor]] = {}
        self._resolved: dict[tuple, tuple[float, Any]] = {}

    async def resolve(self, key: tuple, lookup: Callable[[], Any], keep: Callable[[Any], bool] = lambda _: True) -> Any:
        """Memoises a blocking record lookup (model and fit of a request) for ``RESOLVE_TTL_S``.

        Args:
            key: ``(tenant, model_id, fit_id)``.
            lookup: Blocking function run on a thread when the key is not fresh.
            keep: Whether a result may be memoised (e.g. not "no fit yet").
        """
        now = time.monotonic()
        hit = self._resolved.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await asyncio.get_running_loop().run_in_executor(None, lookup)
        if keep(value):
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[key] = (now + RESOLVE_TTL_S, value)
        return value

    def forget_model(self, model_id: str) -> None:
        """Drops memoised lookups of a model (after it is deleted)."""
        for key in [k for k in self._resolved if k[1] == model_id]:
            self._resolved.pop(key, None)

    async def get(self, model: ModelRecord, fit: FitRecord) -> Predictor:
        """Returns the ready predictor of ``fit``, loading it once if needed."""
        entry = self._entries.get(fit.id)
        if entry is not None:
            self._entries.move_to_end(fit.id)
            return entry
        pending = self._loading.get(fit.id)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Predictor] = loop.create_future()
        self._loading[fit.id] = future
        try:
            predictor = await loop.run_in_executor(None, self._load, model, fit)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved when nobody else waits
            raise
        finally:
            self._loading.pop(fit.id, None)
        future.set_result(predictor)
        self._entries[fit.id] = predictor
        while len(self._entries) > self.settings.predictor_cache_size:
            _, old = self._entries.popitem(last=False)
            if old.batcher is not None:
                old.batcher.close()
        return predictor

    def evict(self, *fit_ids: str) -> None:
        """Drops predictors (after a model is deleted)."""
        for fit_id in fit_ids:
            old = self._entries.pop(fit_id, None)
            if old is not None and old.batcher is not None:
                old.batcher.close()

    def close(self) -> None:
        """Stops every batcher and the thread pool."""
        self.evict(*list(self._entries))
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _posterior_bytes(self, fit: FitRecord) -> tuple[bytes, str]:
        try:
            cached = self.cache.get(fit.id)
        except Exception:  # Redis down: the store is the source of truth
            logger.warning("posterior cache unavailable", exc_info=True)
            cached = None
        if cached is not None:
            return cached, "redis"
        blob = self.catalog.store.get_blob(fit.posterior_sha256)
        try:
            self.cache.put(fit.id, blob)
        except Exception:
            logger.warning("could not re-cache posterior %s", fit.id, exc_info=True)
        return blob, "store"

    def _load(self, model: ModelRecord, fit: FitRecord) -> Predictor:
        import curvature as cv
        from app.domain.modelio import load_model

        imported = load_model(
            self.catalog.store.get_blob(model.sha256),
            model.filename,
            input_shape=tuple(model.input_shape),
            max_bytes=self.settings.max_model_bytes,
        )
        module = imported.module.eval()
        blob, source = self._posterior_bytes(fit)
        try:
            posterior = cv.LaplacePosterior.from_bytes(blob, module)
        except ValueError:
            if source != "redis":
                raise InternalError(
                    f"the stored posterior of fit {fit.id!r} is unreadable", code="fit_unreadable"
                ) from None
            logger.warning("cached posterior of %s is unreadable; reloading from the store", fit.id)
            self.cache.delete(fit.id)
            blob, source = self._posterior_bytes(fit)
            posterior = cv.LaplacePosterior.from_bytes(blob, module)
        self.metrics.predictor_loads.labels(source).inc()
        predictor = Predictor(model=model, fit=fit, posterior=posterior, executor=self.executor)
        # The first predict call builds lazily cached decompositions; pay for it here, not in a request.
        predictor.compute(
            torch.zeros(1, *model.input_shape),
            PredictOptions(
                samples=2, predictive=Predictive(fit.config.get("predictive", Predictive.mc)), ood_score=fit.ood_score, seed=0
            ),
        )
        if self.settings.predict_batching:
            label = model.id

            def on_batch(inputs: int, requests: int, seconds: float) -> None:
                self.metrics.predict_batch_inputs.labels(label).observe(inputs)
                self.metrics.predict_batch_requests.labels(label).observe(requests)
                self.metrics.predict_compute.labels(label).observe(seconds)

            predictor.batcher = MicroBatcher(
                predictor.compute,
                self.executor,
                max_batch=self.settings.predict_max_batch,
                max_wait_s=self.settings.predict_max_wait_ms / 1000,
                concurrency=self.settings.predict_threads,
                on_batch=on_batch,
            )
        return predictor
