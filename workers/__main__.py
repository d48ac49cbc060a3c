"""``python -m workers``: run one worker process against ``KRONLAP_REDIS_URL``."""

import sys

from workers.runner import run_worker

if __name__ == "__main__":
    sys.exit(run_worker())
