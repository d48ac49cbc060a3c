"""``kronlap`` command line: ``serve``, ``worker`` and ``wait``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from app.domain.jobs import FINAL, JobRecord, JobStatus
from app.domain.settings import InsecureSettingsError, Settings, get_settings

logger = logging.getLogger("kronlap")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProgressBar:
    """A tqdm bar over a job's 0-1 progress (plain lines when tqdm is missing or output is not a tty)."""

    def __init__(self, description: str) -> None:
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=100, desc=description, unit="%", bar_format="{l_bar}{bar}| {n:.0f}%{postfix}")
        except ImportError:
            self._bar = None
        self._last: tuple[float, str] | None = None
        self._description = description

    def update(self, progress: float, message: str, status: str) -> None:
        """Moves the bar to ``progress`` (0-1) and shows ``message``."""
        value = round(100 * min(max(progress, 0.0), 1.0), 1)
        text = f"{status}: {message}"[:60]
        if (value, text) == self._last:
            return
        if self._bar is not None:
            self._bar.n = value
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.refresh()
        else:
            print(f"{self._description}: {value:5.1f}% {text}", file=sys.stderr)
        self._last = (value, text)

    def close(self) -> None:
        """Ends the bar."""
        if self._bar is not None:
            self._bar.close()


def _curl_example(host: str, port: int, keyed: bool) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    auth = ' -H "Authorization: Bearer $KRONLAP_API_KEY"' if keyed else ""
    zeros = """$(python3 -c 'print(",".join(["0"] * 784))')"""
    return (
        f"curl -s -X POST http://{shown}:{port}/v1/models/example/predict{auth} "
        "-H 'Content-Type: application/json' \\\n"
        f'  -d "{{\\"inputs\\": [[{zeros}]]}}"'
    )


def serve(host: str, port: int, example: bool, settings: Settings | None = None, log_level: str = "info") -> int:
    """Runs the API (and, in embedded mode, a private Redis and an in-process worker)."""
    import uvicorn

    from app.api.main import create_app

    settings = settings or get_settings()
    if settings.embedded and settings.open_access and not _is_loopback(host):
        print(
            f"refusing to serve without API keys on {host}: bind to 127.0.0.1 or set KRONLAP_API_KEYS",
            file=sys.stderr,
        )
        return 2
    try:
        settings.enforce_secure()
    except InsecureSettingsError as exc:
        print(f"insecure configuration: {exc}", file=sys.stderr)
        return 2
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    runtime = None
    redis_url = settings.redis_url
    if settings.embedded:
        from workers.embedded import start_embedded

        runtime = start_embedded(settings)
        redis_url = runtime.redis_url
        print(f"embedded mode: private Redis at {redis_url}, in-process worker, data in {settings.data_dir}")
    try:
        if example:
            _prepare_example(settings, redis_url or "")
        app = create_app(settings, redis_url=redis_url, on_shutdown=runtime.stop if runtime is not None else None)
        if example:
            print("try:\n" + _curl_example(host, port, not settings.open_access), flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level in ("debug", "info"))
    finally:
        if runtime is not None:
            runtime.stop()
    return 0


def _prepare_example(settings: Settings, redis_url: str) -> None:
    from app.domain.backend import Backend
    from app.domain.example import ensure_example

    backend = Backend.connect(settings, redis_url)
    bar: ProgressBar | None = None

    def on_progress(job: JobRecord) -> None:
        nonlocal bar
        if bar is None:
            bar = ProgressBar("example fit")
        bar.update(job.progress, job.message, job.status.value)

    try:
        print("preparing the example model (MNIST-5k MLP, KFAC fit)...", flush=True)
        start = time.monotonic()
        fit = ensure_example(backend, on_progress)
        if bar is not None:
            bar.close()
        print(f"example ready: model 'example', fit {fit.id} ({time.monotonic() - start:.1f}s)", flush=True)
    finally:
        backend.close()


def wait(job_id: str, url: str, api_key: str | None, interval_s: float = 0.5) -> int:
    """Polls ``GET /v1/jobs/{id}`` of a running service with a progress bar; exit 0 on success."""
    bar: ProgressBar | None = None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        while True:
            request = urllib.request.Request(f"{url.rstrip('/')}/v1/jobs/{job_id}", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    job = json.loads(response.read())
            except urllib.error.HTTPError as exc:
                print(f"\n{exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
                return 1
            except urllib.error.URLError as exc:
                print(f"\ncannot reach {url}: {exc.reason}", file=sys.stderr)
                return 1
            bar = bar or ProgressBar(job_id)
            bar.update(float(job["progress"]), job["message"], job["status"])
            if JobStatus(job["status"]) in FINAL:
                bar.close()
                bar = None
                print(json.dumps(job, indent=2))
                return 0 if job["status"] == "succeeded" else 1
            time.sleep(interval_s)
    finally:
        if bar is not None:
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kronlap`` script."""
    parser = argparse.ArgumentParser(prog="kronlap", description="Bayesian uncertainty for trained networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the API (embedded Redis and worker without KRONLAP_REDIS_URL)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--example", action="store_true", help="register a fitted MNIST MLP as model 'example'")
    p_serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub.add_parser("worker", help="run a worker process against KRONLAP_REDIS_URL")
    p_wait = sub.add_parser("wait", help="follow a job of a running service with a progress bar")
    p_wait.add_argument("job_id")
    p_wait.add_argument("--url", default="http://127.0.0.1:8000")
    p_wait.add_argument("--api-key", default=None, help="API key (default: $KRONLAP_API_KEY)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(args.host, args.port, args.example, log_level=args.log_level)
    if args.command == "worker":
        from workers.runner import run_worker

        return run_worker()
    import os

    return wait(args.job_id, args.url, args.api_key or os.environ.get("KRONLAP_API_KEY"))


if __name__ == "__main__":
    sys.exit(main())
