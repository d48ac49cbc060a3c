"""The long-lived objects of one API process, built at start-up and shared by the routes."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from dramatiq.brokers.redis import RedisBroker

from app.cache import PosteriorCache
from app.catalog import Catalog
from app.jobs import JobStore
from app.metrics import Metrics
from app.predictor import PredictorPool
from app.settings import Settings
from app.store import ArtifactStore


@dataclass
class Services:
    """Connections and caches of the API.

    Attributes:
        settings: Service settings.
        redis: Redis client (bytes responses).
        store: Artifact store.
        catalog: Typed records on the store.
        jobs: Job records.
        cache: Posterior cache in Redis.
        broker: Dramatiq broker used to enqueue jobs.
        predictors: Ready posteriors and their micro-batchers.
        metrics: Prometheus metrics.
    """

    settings: Settings
    redis: redis.Redis
    store: ArtifactStore
    catalog: Catalog
    jobs: JobStore
    cache: PosteriorCache
    broker: RedisBroker
    predictors: PredictorPool
    metrics: Metrics

    @classmethod
    def build(cls, settings: Settings, redis_url: str, metrics: Metrics) -> Services:
        """Connects to Redis at ``redis_url`` and opens the store of ``settings``."""
        from workers.broker import make_broker

        client = redis.Redis.from_url(redis_url, health_check_interval=30)
        store = ArtifactStore(settings.data_dir)
        catalog = Catalog(store)
        cache = PosteriorCache(client, settings.redis_namespace, settings.posterior_cache_ttl_s)
        return cls(
            settings=settings,
            redis=client,
            store=store,
            catalog=catalog,
            jobs=JobStore(client, settings.redis_namespace, settings.job_ttl_s),
            cache=cache,
            broker=make_broker(settings, url=redis_url),
            predictors=PredictorPool(settings, catalog, cache, metrics),
            metrics=metrics,
        )

    def close(self) -> None:
        """Releases threads and connections."""
        self.predictors.close()
        self.broker.close()
        self.redis.close()
