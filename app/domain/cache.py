"""Redis cache of serialised posteriors and of each model's newest fit (the store stays the source of truth)."""

from __future__ import annotations

import redis


class PosteriorCache:
    """Posterior bytes by fit id, with a time to live.

    Args:
        client: Redis client.
        namespace: Key prefix.
        ttl_s: Lifetime of an entry.
    """

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s

    def key(self, fit_id: str) -> str:
        """Redis key of a cached posterior."""
        return f"{self.namespace}:posterior:{fit_id}"

    def get(self, fit_id: str) -> bytes | None:
        """Cached bytes, or ``None``."""
        value = self.client.get(self.key(fit_id))
        return bytes(value) if value is not None else None

    def put(self, fit_id: str, blob: bytes) -> None:
        """Caches ``blob`` for ``fit_id``."""
        self.client.set(self.key(fit_id), blob, ex=self.ttl_s)

    def latest_key(self, model_id: str) -> str:
        """Redis key naming the newest fit of a model."""
        return f"{self.namespace}:latest-fit:{model_id}"

    def latest(self, model_id: str) -> str | None:
        """Id of the model's newest fit as last recorded, or ``None``."""
        value = self.client.get(self.latest_key(model_id))
        return value.decode() if isinstance(value, bytes) else value

    def set_latest(self, model_id: str, fit_id: str) -> None:
        """Records ``fit_id`` as the model's newest fit."""
        self.client.set(self.latest_key(model_id), fit_id, ex=self.ttl_s)

    def forget_latest(self, model_id: str) -> None:
        """Drops the newest-fit pointer of a model."""
        self.client.delete(self.latest_key(model_id))

    def delete(self, *fit_ids: str) -> None:
        """Drops cached entries."""
        if fit_ids:
            self.client.delete(*(self.key(f) for f in fit_ids))
