"""Ready posteriors in the API process and fair, micro-batched scheduling of predict requests.

:class:`PredictorPool` keeps an LRU of :class:`Predictor` objects, each a deserialised
``cv.LaplacePosterior`` over its imported network, loaded from the Redis cache or else the artifact store
(and put back in the cache). Loading happens once per fit even under concurrent first requests.

:class:`MicroBatcher` schedules the requests of one posterior onto a small thread pool
(``predict_threads``) running ``post.predict``:

- Cutting: a request costing more than ``predict_chunk_cost`` (inputs × MC samples) is cut into chunks of
  that cost; its answer is assembled from the chunks in order.
- Fair turns: requests with work left wait in one round-robin queue. Each free thread takes the next
  request's next chunk, and a request with more left goes to the back, so a small request waits for at most
  the chunks already running, never for a whole large request.
- A free thread for small requests: with two or more threads, chunks of cut requests hold at most all but
  one of them.
- Micro-batching, as Triton's dynamic batcher and Ray Serve's ``@serve.batch`` do: a turn of a small
  request also takes the other waiting small requests with the same options, up to the chunk size, and
  waits up to ``max_wait`` for more (only while requests have been arriving concurrently, so a lone client
  pays no delay). Requests carrying an explicit ``seed`` are never merged and are cut the same way under
  any load, so a seeded request returns the same numbers under any load.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
SAMPLE_BANK_BYTES = 2 * 2**30


class PredictOptions(NamedTuple):
    """Options that must agree for requests to share a batch."""

    samples: int
    predictive: str
    ood_score: str
    seed: int | None


@dataclass(eq=False)
class _Request:
    """A request being served: rows are handed out in chunks, answers collected by first row."""

    x: torch.Tensor
    options: PredictOptions
    future: asyncio.Future[Outputs]
    chunk_rows: int
    next_row: int = 0
    done_rows: int = 0
    parts: dict[int, tuple[Outputs, int]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def left(self) -> int:
        """Rows not handed out yet."""
        return self.rows - self.next_row

    @property
    def cut(self) -> bool:
        """Whether the request is served in more than one chunk."""
        return self.rows > self.chunk_rows

    @property
    def mergeable(self) -> bool:
        return self.options.seed is None and not self.cut

    def take(self, rows: int) -> _Piece:
        start = self.next_row
        self.next_row = min(self.rows, start + rows)
        return _Piece(self, start, self.next_row)

    def collect(self, start: int, outputs: Outputs, rows: int) -> None:
        self.parts[start] = (outputs, rows)
        self.done_rows += rows
        if self.done_rows < self.rows or self.future.done():
            return
        ordered = [self.parts[k] for k in sorted(self.parts)]
        if len(ordered) == 1:
            self.future.set_result(ordered[0][0])
            return
        merged: Outputs = {}
        for key, first in ordered[0][0].items():
            batch_first = all(part[key].ndim > 0 and part[key].shape[0] == n for part, n in ordered)
            merged[key] = np.concatenate([part[key] for part, _ in ordered]) if batch_first else first
        self.future.set_result(merged)


class _Piece(NamedTuple):
    request: _Request
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start


class MicroBatcher:
    """Cuts, interleaves and merges requests into calls of ``run`` (see the module docstring).

    Args:
        run: Blocking function ``(x, options) -> outputs`` (arrays with the batch first), run on ``executor``.
        executor: Thread pool for ``run``.
        max_batch: Most inputs per call.
        max_wait_s: How long an open batch waits for more requests.
        concurrency: Calls allowed in flight at once (the executor's size).
        on_batch: Called with ``(inputs, requests, seconds)`` after every call (metrics).
        chunk_cost: Most inputs × samples per call.
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor, PredictOptions], Outputs],
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_wait_s: float,
        concurrency: int = 1,
        on_batch: Callable[[int, int, float], None] | None = None,
        chunk_cost: int = 2**62,
    ) -> None:
        self.run = run
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.concurrency = concurrency
        self.on_batch = on_batch
        self.chunk_cost = chunk_cost
        self.cut_slots = max(1, concurrency - 1)
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._cut_running = 0
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._last_batch_requests = 0
        self._closing = False

    def chunk_rows(self, options: PredictOptions) -> int:
        """Rows per call for requests with ``options``: the chunk cost over the samples, within the batch cap."""
        return max(1, min(self.max_batch, self.chunk_cost // max(1, options.samples)))

    async def submit(self, x: torch.Tensor, options: PredictOptions) -> Outputs:
        """Queues ``x`` and returns its outputs, assembled from however many calls served it."""
        loop = asyncio.get_running_loop()
        self._closing = False
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop(), name="kronlap-microbatcher")
        request = _Request(x=x, options=options, future=loop.create_future(), chunk_rows=self.chunk_rows(options))
        self._queue.append(request)
        self._wakeup.set()
        return await request.future

    def close(self) -> None:
        """Lets the batching task finish the queued requests, then stop (it restarts on a later submit)."""
        self._closing = True
        self._wakeup.set()

    def _eligible(self, request: _Request) -> bool:
        return not request.cut or self._cut_running < self.cut_slots

    def _pick(self) -> _Request | None:
        """The first request in turn that may run now (dropping finished or abandoned ones)."""
        for request in list(self._queue):
            if request.future.done() or request.left == 0:
                self._queue.remove(request)
                continue
            if self._eligible(request):
                return request
        return None

    def _merge(self, head: _Request, room: int) -> list[_Piece]:
        """Whole small requests with the head's options that fit in ``room`` rows."""
        pieces: list[_Piece] = []
        for request in list(self._queue):
            if room <= 0:
                break
            if request.future.done():
                self._queue.remove(request)
            elif request.mergeable and request.options == head.options and request.left <= room:
                pieces.append(request.take(request.left))
                room -= pieces[-1].rows
                self._queue.remove(request)
        return pieces

    async def _next_batch(self) -> list[_Piece] | None:
        while True:
            head = self._pick()
            if head is not None:
                break
            if self._closing and not self._queue:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [head.take(head.chunk_rows)]
        self._queue.remove(head)
        if head.left > 0:
            self._queue.append(head)  # back of the line: its next chunk comes after the others' turns
        if not head.mergeable:
            return batch
        rows = batch[0].rows
        loop = asyncio.get_running_loop()
        # Wait for company only when requests have been arriving concurrently; a lone client pays nothing.
        waiting = any(r.mergeable and r.options == head.options for r in self._queue)
        wait_s = self.max_wait_s if self._last_batch_requests > 1 or waiting else 0.0
        deadline = loop.time() + wait_s
        while rows < head.chunk_rows:
            more = self._merge(head, head.chunk_rows - rows)
            batch += more
            rows += sum(p.rows for p in more)
            remaining = deadline - loop.time()
            if rows >= head.chunk_rows or remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                batch += self._merge(head, head.chunk_rows - rows)
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
            cut = any(piece.request.cut for piece in batch)
            if cut:
                self._cut_running += 1
            task = asyncio.get_running_loop().create_task(self._execute(batch, cut))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _execute(self, batch: list[_Piece], cut: bool) -> None:
        try:
            xs = [piece.request.x[piece.start : piece.end] for piece in batch]
            x = xs[0] if len(xs) == 1 else torch.cat(xs)
            start = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                outputs = await loop.run_in_executor(self.executor, self.run, x, batch[0].request.options)
            except Exception as exc:
                for piece in batch:
                    if not piece.request.future.done():
                        piece.request.future.set_exception(exc)
                return
            if self.on_batch is not None:
                self.on_batch(int(x.shape[0]), len(batch), time.perf_counter() - start)
            rows = int(x.shape[0])
            offset = 0
            for piece in batch:
                end = offset + piece.rows
                part = {k: v[offset:end] if v.ndim and v.shape[0] == rows else v for k, v in outputs.items()}
                piece.request.collect(piece.start, part, piece.rows)
                offset = end
        finally:
            if cut:
                self._cut_running -= 1
            self._slots.release()
            self._wakeup.set()


class SampleBanks:
    """Weight-sample sets of a posterior for several ``(samples, seed)`` keys, shared by its replicas.

    ``post.predict`` keeps the K weight samples of the last ``(K, seed)`` it drew and redraws when another
    key comes; a server mixing requests of 100 and 1,000 samples would redraw on every call. The predictor
    keeps the sets it has seen (most recent first, within ``max_bytes``) and offers them to a replica before
    each call; replicas of one fit draw identical sets for one key, so one copy serves them all.
    """

    def __init__(self, max_bytes: int = SAMPLE_BANK_BYTES) -> None:
        self.max_bytes = max_bytes
        self._sets: OrderedDict[Any, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def before(self, posterior: Any) -> None:
        """Offers every kept set to ``posterior``."""
        bank = getattr(posterior, "_bank", None)
        if not isinstance(bank, dict):
            return
        with self._lock:
            if self._sets and any(key not in bank for key in self._sets):
                posterior._bank = {**self._sets, **bank}

    def after(self, posterior: Any) -> None:
        """Keeps the sets ``posterior`` holds (a new draw, if any), within the byte budget."""
        bank = getattr(posterior, "_bank", None)
        if not isinstance(bank, dict):
            return
        with self._lock:
            for key, draws in list(bank.items()):
                self._sets[key] = draws
                self._sets.move_to_end(key)
            total = 0
            for key in reversed(list(self._sets)):
                total += sum(t.numel() * t.element_size() for t in self._sets[key].values())
                if total > self.max_bytes:
                    del self._sets[key]


@dataclass(eq=False)
class Predictor:
    """A posterior ready to answer predict requests.

    ``post.predict`` is not safe to call from two threads on one posterior (the linearised predictive hooks
    the network's layers), so a predictor holds one replica per predict thread, each loaded from the same
    bytes, and a call takes a free one.

    Attributes:
        model: The model's record.
        fit: The fit's record.
        replicas: Deserialised ``cv.LaplacePosterior`` objects of the fit, one per predict thread.
        batcher: Micro-batcher, or ``None`` when batching is off.
    """

    model: ModelRecord
    fit: FitRecord
    replicas: list[Any]
    executor: ThreadPoolExecutor
    batcher: MicroBatcher | None = None
    banks: SampleBanks = field(default_factory=SampleBanks)
    _free: queue.SimpleQueue = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._free = queue.SimpleQueue()
        for replica in self.replicas:
            self._free.put(replica)

    @property
    def posterior(self) -> Any:
        """The first replica (for reading the fit's properties)."""
        return self.replicas[0]

    def compute(self, x: torch.Tensor, options: PredictOptions) -> Outputs:
        """Blocking call of ``post.predict`` on a free replica; returns numpy arrays."""
        posterior = self._free.get()
        try:
            self.banks.before(posterior)
            out = posterior.predict(
                x,
                samples=options.samples,
                predictive=options.predictive,
                ood_score=options.ood_score,
                seed=options.seed,
            )
            self.banks.after(posterior)
        finally:
            self._free.put(posterior)
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
        # torch's intra-op thread count is per OS thread: every thread that computes gets the process's, so
        # the numbers do not depend on which thread served a request.
        self.torch_threads = torch.get_num_threads()
        self.executor = ThreadPoolExecutor(
            settings.predict_threads,
            thread_name_prefix="kronlap-predict",
            initializer=torch.set_num_threads,
            initargs=(self.torch_threads,),
        )
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

        torch.set_num_threads(self.torch_threads)  # lazily built decompositions come out the same on any thread
        model_bytes = self.catalog.store.get_blob(model.sha256)

        def network() -> torch.nn.Module:
            imported = load_model(
                model_bytes,
                model.filename,
                input_shape=tuple(model.input_shape),
                max_bytes=self.settings.max_model_bytes,
            )
            return imported.module.eval()

        blob, source = self._posterior_bytes(fit)
        try:
            first = cv.LaplacePosterior.from_bytes(blob, network())
        except ValueError:
            if source != "redis":
                raise InternalError(
                    f"the stored posterior of fit {fit.id!r} is unreadable", code="fit_unreadable"
                ) from None
            logger.warning("cached posterior of %s is unreadable; reloading from the store", fit.id)
            self.cache.delete(fit.id)
            blob, source = self._posterior_bytes(fit)
            first = cv.LaplacePosterior.from_bytes(blob, network())
        replicas = [first] + [
            cv.LaplacePosterior.from_bytes(blob, network()) for _ in range(self.settings.predict_threads - 1)
        ]
        self.metrics.predictor_loads.labels(source).inc()
        predictor = Predictor(model=model, fit=fit, replicas=replicas, executor=self.executor)
        # The first predict call builds lazily cached decompositions; pay for it here, not in a request.
        warm = PredictOptions(
            samples=2,
            predictive=Predictive(fit.config.get("predictive", Predictive.mc)),
            ood_score=fit.ood_score,
            seed=0,
        )
        for _ in replicas:  # each call takes another free replica (they are handed out in turn)
            predictor.compute(torch.zeros(1, *model.input_shape), warm)
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
                chunk_cost=self.settings.predict_chunk_cost,
            )
        return predictor
