"""The queue contract between the API and the workers: broker configuration, message shape, ``enqueue``.

Jobs travel as Dramatiq messages on the Redis broker. Both sides build the broker with :func:`make_broker`,
so they agree on the Redis namespace and the middleware. A message names a queue and an actor (both
declared by the job kind, :mod:`app.domain.kinds`) and carries one argument: the kind's params as a JSON
object (:class:`app.domain.kinds.base.JobParams`). :func:`enqueue` builds that message directly, so the API
never imports an actor; the workers declare the actors (:mod:`workers.actors`).

Delivery is at least once. A worker silent for ``heartbeat_timeout`` is presumed dead and queue maintenance
(run on ``maintenance_chance`` out of a million commands of the surviving workers) puts its unacknowledged
messages back on the queue. Dead-lettered messages are kept for ``dead_message_ttl``.

Composition is Dramatiq's own: a group of messages may carry completion callbacks (a sharded fit's reduce
step), counted down by a barrier in the same Redis (:class:`dramatiq.middleware.GroupCallbacks`).
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    GroupCallbacks,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)
from dramatiq.rate_limits.backends import RedisBackend as RedisRateLimiterBackend

from app.domain.settings import Settings


def dramatiq_namespace(settings: Settings) -> str:
    """Key prefix of the broker's Redis keys."""
    return f"{settings.redis_namespace}.dramatiq"


def make_broker(settings: Settings, *, url: str | None = None, extra: list[Middleware] | None = None) -> RedisBroker:
    """Builds the Redis broker both front ends use; no actor is declared on it.

    Args:
        settings: Service settings (Redis URL, heartbeat and maintenance knobs, retries).
        url: Redis URL overriding ``settings.redis_url`` (the embedded Redis).
        extra: Middleware appended after the standard ones (the workers' heartbeat).

    Raises:
        ValueError: No Redis URL is known.
    """
    redis_url = url or settings.redis_url
    if not redis_url:
        raise ValueError("no Redis URL: set KRONLAP_REDIS_URL or start the embedded Redis first")
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        GroupCallbacks(RedisRateLimiterBackend(url=redis_url), barrier_ttl=settings.job_ttl_s * 1000),
        Retries(max_retries=settings.fit_max_retries, min_backoff=1000, max_backoff=60_000),
        CurrentMessage(),
        *(extra or []),
    ]
    return RedisBroker(
        url=redis_url,
        namespace=dramatiq_namespace(settings),
        middleware=middleware,
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        dead_message_ttl=settings.dead_message_ttl_ms,
        maintenance_chance=settings.maintenance_chance,
    )


def enqueue(broker: RedisBroker, queue: str, actor: str, body: dict[str, Any]) -> dramatiq.Message:
    """Puts one job message on ``queue`` for ``actor``, without the actor being declared here.

    Args:
        broker: A broker from :func:`make_broker`.
        queue: Queue name (the kind's ``queue``).
        actor: Actor name (the kind's ``actor``).
        body: The job's params (JSON object); the actor's only argument.

    Returns:
        The enqueued message.
    """
    message = dramatiq.Message(queue_name=queue, actor_name=actor, args=(body,), kwargs={}, options={})
    return broker.enqueue(message)


def queue_depth(broker: RedisBroker, queue: str) -> int:
    """Messages waiting (not yet fetched) on ``queue``."""
    return int(broker.client.llen(f"{broker.namespace}:{queue}"))
