"""The registry of job kinds: one module each (:mod:`.fit`, ...), all built on :mod:`.base`."""

from __future__ import annotations

from app.domain.kinds.base import JobKind, JobParams, JobResult, JobRun, execute, submit
from app.domain.kinds.fit import FIT
from app.domain.kinds.online import ONLINE_LAPLACE
from app.domain.kinds.optimise import OPTIMISE

KINDS: dict[str, JobKind] = {kind.name: kind for kind in (FIT, OPTIMISE, ONLINE_LAPLACE)}
"""Every job kind by name; the workers declare one actor per entry."""

QUEUES: tuple[str, ...] = tuple(dict.fromkeys(kind.queue for kind in KINDS.values()))
"""Every queue a job can be sent to."""

__all__ = ["FIT", "KINDS", "ONLINE_LAPLACE", "OPTIMISE", "QUEUES", "JobKind", "JobParams", "JobResult", "JobRun", "execute", "submit"]
