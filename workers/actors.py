"""Dramatiq actors: the broker-facing wrappers of :mod:`workers.jobs`.

Retries and time limits are stated where the actor is declared. Permanent failures
(:class:`~workers.jobs.PermanentJobError`) and time-limit interrupts are never retried; anything else
(Redis or disk hiccups) is retried up to ``fit_max_retries`` times with back-off.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, TimeLimitExceeded

from app.settings import Settings
from workers.jobs import FIT_KIND, FitParams, JobContext, PermanentJobError, run_fit

logger = logging.getLogger(__name__)

FIT_ACTOR = "fit_laplace"


def declare_actors(broker: RedisBroker, settings: Settings, redis_url: str) -> dict[str, dramatiq.Actor]:
    """Declares the job actors on ``broker``.

    Args:
        broker: The broker.
        settings: Time limits, retries, store location.
        redis_url: Where job records and the posterior cache live (the broker's Redis).

    Returns:
        Actors by job kind.
    """
    max_retries = settings.fit_max_retries

    @lru_cache(maxsize=1)
    def context() -> JobContext:
        return JobContext.from_settings(settings, redis_url=redis_url)

    @dramatiq.actor(
        broker=broker,
        actor_name=FIT_ACTOR,
        queue_name="fits",
        time_limit=settings.fit_time_limit_s * 1000,
        max_retries=max_retries,
        throws=(PermanentJobError, TimeLimitExceeded),
    )
    def fit_laplace(params: dict) -> None:
        message = CurrentMessage.get_current_message()
        retries = int(message.options.get("retries", 0)) if message is not None else 0
        run_fit(FitParams.model_validate(params), context(), final_attempt=retries >= max_retries)

    return {FIT_KIND: fit_laplace}
