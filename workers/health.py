"""``python -m workers.health``: exit 0 when this container's worker heartbeat is fresh (Docker healthcheck)."""

from __future__ import annotations

import sys

from app.domain.settings import get_settings
from workers.runner import heartbeat_age_s


def main() -> int:
    """Checks the heartbeat file named by ``KRONLAP_WORKER_HEARTBEAT_FILE``."""
    settings = get_settings()
    if settings.worker_heartbeat_file is None:
        print("KRONLAP_WORKER_HEARTBEAT_FILE is not set", file=sys.stderr)
        return 1
    age = heartbeat_age_s(settings.worker_heartbeat_file)
    limit = settings.heartbeat_timeout_ms / 1000
    if age > limit:
        print(f"worker heartbeat is {age:.1f}s old (limit {limit:.1f}s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
