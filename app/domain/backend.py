"""The domain's connections: settings, Redis, the artifact store and what is built on them.

Both front ends work through a :class:`Backend`: the API extends it with its predictors and metrics
(:class:`app.api.services.Services`), the workers hand one to every job run.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from dramatiq.brokers.redis import RedisBroker

from app.domain.cache import PosteriorCache
from app.domain.catalog import Catalog
from app.domain.jobs import JobStore
from app.domain.queue import make_broker
from app.domain.settings import Settings
from app.domain.store import ArtifactStore, Store


def open_store(settings: Settings) -> Store:
    """The artifact store the settings name: S3-compatible object storage for ``KRONLAP_STORE_URL=s3://...``
    (endpoint ``KRONLAP_S3_ENDPOINT_URL``, credentials from the environment), else the directory
    ``KRONLAP_DATA_DIR``."""
    if settings.store_url:
        from app.domain.objectstore import S3ArtifactStore

        return S3ArtifactStore(settings.store_url, endpoint_url=settings.s3_endpoint_url)
    return ArtifactStore(settings.data_dir)


@dataclass
class Backend:
    """Connections and stores shared by the API, the workers and the CLI.

    Attributes:
        settings: Service settings.
        redis: Redis client (bytes responses).
        store: Artifact store.
        catalog: Typed records on the store.
        jobs: Job records.
        cache: Posterior cache in Redis.
        broker: Dramatiq broker used to enqueue jobs (no actors declared on it).
    """

    settings: Settings
    redis: redis.Redis
    store: Store
    catalog: Catalog
    jobs: JobStore
    cache: PosteriorCache
    broker: RedisBroker

    @classmethod
    def connect_fields(cls, settings: Settings, redis_url: str | None = None) -> dict:
        """Opens Redis at ``redis_url`` (default: the settings') and the store; the fields of a backend."""
        url = redis_url or settings.redis_url
        if not url:
            raise ValueError("no Redis URL: set KRONLAP_REDIS_URL or start the embedded Redis first")
        client = redis.Redis.from_url(url, health_check_interval=30)
        store = open_store(settings)
        return {
            "settings": settings,
            "redis": client,
            "store": store,
            "catalog": Catalog(store),
            "jobs": JobStore(client, settings.redis_namespace, settings.job_ttl_s),
            "cache": PosteriorCache(client, settings.redis_namespace, settings.posterior_cache_ttl_s),
            "broker": make_broker(settings, url=url),
        }

    @classmethod
    def connect(cls, settings: Settings, redis_url: str | None = None) -> Backend:
        """A backend on Redis at ``redis_url`` (default: the settings') and the configured store."""
        return cls(**cls.connect_fields(settings, redis_url))

    def close(self) -> None:
        """Releases connections."""
        self.broker.close()
        self.redis.close()
