"""Dramatiq actors: one per job kind (:data:`app.domain.kinds.KINDS`), each a thin wrapper of
:func:`app.domain.kinds.execute`.

Retries and time limits are stated where the actor is declared, from the kind. Permanent failures
(:class:`~app.domain.jobs.PermanentJobError`) and time-limit interrupts are never retried; anything else
(Redis or disk hiccups) is retried up to the kind's ``max_retries`` with back-off.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, TimeLimitExceeded

from app.domain.backend import Backend
from app.domain.jobs import PermanentJobError
from app.domain.kinds import KINDS, JobKind, execute
from app.domain.kinds.base import Stage
from app.domain.settings import Settings

logger = logging.getLogger(__name__)


def declare_actors(broker: RedisBroker, settings: Settings, redis_url: str) -> dict[str, dramatiq.Actor]:
    """Declares one actor per job kind on ``broker``, plus the kinds' further stages (a sharded fit's shard and
    reduce steps), each with its kind's queue, time limit and retries.

    Args:
        broker: The broker.
        settings: Time limits, retries, store location.
        redis_url: Where job records and the posterior cache live (the broker's Redis).

    Returns:
        Actors by job kind, and stage actors by actor name.
    """

    @lru_cache(maxsize=1)
    def backend() -> Backend:
        return Backend.connect(settings, redis_url=redis_url)

    def declare(kind: JobKind) -> dramatiq.Actor:
        max_retries = kind.max_retries(settings)

        def run_job(params: dict) -> None:
            message = CurrentMessage.get_current_message()
            retries = int(message.options.get("retries", 0)) if message is not None else 0
            execute(kind, params, backend(), final_attempt=retries >= max_retries)

        run_job.__name__ = kind.actor
        return dramatiq.actor(
            run_job,
            broker=broker,
            actor_name=kind.actor,
            queue_name=kind.queue,
            time_limit=kind.time_limit_s(settings) * 1000,
            max_retries=max_retries,
            throws=(PermanentJobError, TimeLimitExceeded),
        )

    def declare_stage(kind: JobKind, name: str, stage: Stage) -> dramatiq.Actor:
        max_retries = kind.max_retries(settings)

        def run_stage(body: dict) -> None:
            message = CurrentMessage.get_current_message()
            retries = int(message.options.get("retries", 0)) if message is not None else 0
            stage(body, backend(), retries >= max_retries)

        run_stage.__name__ = name
        return dramatiq.actor(
            run_stage,
            broker=broker,
            actor_name=name,
            queue_name=kind.queue,
            time_limit=kind.time_limit_s(settings) * 1000,
            max_retries=max_retries,
            throws=(PermanentJobError, TimeLimitExceeded),
        )

    actors = {name: declare(kind) for name, kind in KINDS.items()}
    for kind in KINDS.values():
        for name, stage in kind.stages().items():
            actors[name] = declare_stage(kind, name, stage)
    return actors
