"""``kronlap`` command line: ``serve`` and ``worker`` run the service; every other command is a client of a
running service (:class:`app.client.Client`): ``models``, ``datasets``, ``fit``, ``fits``, ``jobs``, ``wait``,
``predict`` and ``health``. Client commands take ``--url`` (``$KRONLAP_URL``) and ``--api-key``
(``$KRONLAP_API_KEY``) and print JSON.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.client import ApiError, Client
from app.domain.jobs import JobRecord
from app.domain.settings import InsecureSettingsError, Settings, get_settings
from curvature.options import (
    ContinualMethod,
    Curvature,
    Damping,
    LikelihoodName,
    OodScore,
    Predictive,
    TrainingMethod,
    Tuning,
)

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
        text = f"{status}: {message}"[:90]
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


def _curl_example(host: str, port: int, settings: Settings) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    keyed = not settings.open_access
    auth = ' -H "Authorization: Bearer $KRONLAP_API_KEY"' if keyed else ""
    zeros = """$(python3 -c 'print(",".join(["0"] * 784))')"""
    note = f"# KRONLAP_API_KEY: a key of tenant {settings.example_tenant!r}, which owns the example\n" if keyed else ""
    return (
        f"{note}curl -s -X POST http://{shown}:{port}/v1/models/example/predict{auth} "
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
    try:
        sock = bind_port(host, port)
    except OSError as exc:
        print(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another port with "
            "`kronlap serve --port N` (or `make run PORT=N`)",
            file=sys.stderr,
        )
        return 2
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    runtime = None
    redis_url = settings.redis_url
    try:
        if settings.embedded:
            from workers.embedded import start_embedded

            runtime = start_embedded(settings)
            redis_url = runtime.redis_url
            print(f"embedded mode: private Redis at {redis_url}, in-process worker, data in {settings.data_dir}")
        if example:
            _prepare_example(settings, redis_url or "")
        app = create_app(settings, redis_url=redis_url, on_shutdown=runtime.stop if runtime is not None else None)
        if example:
            print("try:\n" + _curl_example(host, port, settings), flush=True)
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, access_log=log_level in ("debug", "info")
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if runtime is not None:
            runtime.stop()
    return 0


def bind_port(host: str, port: int) -> socket.socket:
    """Binds the server's listening socket now, so a busy port fails before anything slow starts.

    Raises:
        OSError: The address is in use or cannot be assigned.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


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


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _details_text(details: dict[str, Any] | None) -> str:
    if not details:
        return ""
    parts = []
    for key, value in details.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, (int, str, bool)):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def follow(client: Client, job_id: str, interval_s: float = 0.5) -> dict[str, Any]:
    """Waits for a job with a progress bar (message and live ``details`` such as step and loss beside it)."""
    bar: ProgressBar | None = None

    def on_update(job: dict[str, Any]) -> None:
        nonlocal bar
        bar = bar or ProgressBar(job_id)
        extra = _details_text(job.get("details"))
        message = f"{job['message']} {extra}".strip() if extra else job["message"]
        bar.update(float(job["progress"]), message, job["status"])

    try:
        return client.wait(job_id, on_update=on_update, interval_s=interval_s)
    finally:
        if bar is not None:
            bar.close()


def wait(job_id: str, url: str, api_key: str | None, interval_s: float = 0.5) -> int:
    """Follows ``GET /v1/jobs/{id}`` of a running service with a progress bar; exit 0 on success."""
    job = follow(Client(url, api_key), job_id, interval_s)
    _print_json(job)
    return 0 if job["status"] == "succeeded" else 1


def _option_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _fit_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in ("validation", "curvature", "damping", "tuning", "predictive", "ood_score", "samples", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    options.update(_pairs(args.option))
    return options


def _pairs(pairs: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option takes key=value, got {pair!r}")
        out.append((key, _option_value(value)))
    return out


def _run_client_command(args: argparse.Namespace) -> int:
    client = Client(args.url, args.api_key or os.environ.get("KRONLAP_API_KEY"))
    command = args.command
    if command == "wait":
        return wait(args.job_id, args.url, client.api_key)
    if command == "models":
        if args.action == "upload":
            _print_json(
                client.upload_model(
                    args.file,
                    task=args.task,
                    input_shape=args.input_shape and [int(d) for d in args.input_shape.split(",")],
                    class_names=args.class_names and args.class_names.split(","),
                    name=args.name,
                )
            )
        elif args.action == "list":
            _print_json(client.models())
        elif args.action == "get":
            _print_json(client.model(args.id))
        else:
            client.delete_model(args.id)
            print(f"deleted model {args.id}")
        return 0
    if command == "datasets":
        if args.action == "upload":
            _print_json(client.upload_dataset(args.file, name=args.name))
        elif args.action == "list":
            _print_json(client.datasets())
        elif args.action == "get":
            _print_json(client.dataset(args.id))
        else:
            client.delete_dataset(args.id)
            print(f"deleted dataset {args.id}")
        return 0
    if command == "fit":
        submitted = client.fit(args.model, args.dataset, **_fit_options(args))
        if not args.wait:
            _print_json(submitted)
            return 0
        job = follow(client, submitted["job"]["id"])
        _print_json({"fit_id": submitted["fit_id"], "job": job})
        return 0 if job["status"] == "succeeded" else 1
    if command in ("optimise", "online"):
        options = dict(_pairs(args.option))
        if command == "optimise":
            for name in ("method", "likelihood", "steps", "epochs", "batch_size", "lr", "seed"):
                options.setdefault(name, getattr(args, name))
            submitted = client.optimise(args.model, args.dataset, **options)
        else:
            for name in ("model", "continue_from", "method", "curvature", "strength", "epochs", "seed"):
                options.setdefault(name, getattr(args, name))
            submitted = client.online_laplace(args.datasets, **options)
        if not args.wait:
            _print_json(submitted)
            return 0
        job = follow(client, submitted["job"]["id"])
        _print_json(job)
        return 0 if job["status"] == "succeeded" else 1
    if command == "artifact":
        if args.name is None:
            _print_json(client.artifacts(args.job))
            return 0
        data = client.artifact(args.job, args.name)
        target = Path(args.output or args.name)
        target.write_bytes(data)
        print(f"{len(data)} bytes written to {target}")
        return 0
    if command == "fits":
        _print_json(client.fits(args.id) if args.action == "list" else client.get_fit(args.id))
        return 0
    if command == "jobs":
        if args.action == "list":
            _print_json(client.jobs(limit=args.limit))
        elif args.action == "get":
            _print_json(client.job(args.id))
        else:
            _print_json(client.cancel(args.id))
        return 0
    if command == "predict":
        answer = client.predict_file(
            args.model,
            args.file,
            key=args.key,
            samples=args.samples,
            predictive=args.predictive,
            ood_score=args.ood_score,
            fit=args.fit,
            seed=args.seed,
        )
        if args.output:
            Path(args.output).write_text(json.dumps(answer))
            flagged = sum(1 for r in answer["results"] if r.get("ood"))
            print(f"{len(answer['results'])} results ({flagged} flagged OOD) written to {args.output}")
        else:
            _print_json(answer)
        return 0
    if command == "health":
        _print_json({"healthz": client.health(), "readyz": client.ready()})
        return 0
    raise SystemExit(f"unknown command {command!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kronlap", description="Bayesian uncertainty for trained networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the API (embedded Redis and worker without KRONLAP_REDIS_URL)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000), bound before anything else")
    p_serve.add_argument("--example", action="store_true", help="register a fitted MNIST MLP as model 'example'")
    p_serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub.add_parser("worker", help="run a worker process against KRONLAP_REDIS_URL")

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--url", default=os.environ.get("KRONLAP_URL", "http://127.0.0.1:8000"), help="service URL ($KRONLAP_URL)"
    )
    remote.add_argument("--api-key", default=None, help="API key (default: $KRONLAP_API_KEY)")

    p_wait = sub.add_parser("wait", parents=[remote], help="follow a job with a progress bar")
    p_wait.add_argument("job_id")

    p_models = sub.add_parser("models", help="upload, list, show or delete models")
    models = p_models.add_subparsers(dest="action", required=True)
    up = models.add_parser("upload", parents=[remote], help="upload an .onnx or .pt2 network")
    up.add_argument("file")
    up.add_argument("--task", choices=["classification", "regression"])
    up.add_argument("--input-shape", help="per-example shape, e.g. 1,28,28")
    up.add_argument("--class-names", help="comma-separated class names")
    up.add_argument("--name")
    models.add_parser("list", parents=[remote])
    for action in ("get", "delete"):
        models.add_parser(action, parents=[remote]).add_argument("id")

    p_data = sub.add_parser("datasets", help="upload, list, show or delete datasets")
    data = p_data.add_subparsers(dest="action", required=True)
    up = data.add_parser("upload", parents=[remote], help="upload an .npz with x, y (and x_val, y_val)")
    up.add_argument("file")
    up.add_argument("--name")
    data.add_parser("list", parents=[remote])
    for action in ("get", "delete"):
        data.add_parser(action, parents=[remote]).add_argument("id")

    p_fit = sub.add_parser("fit", parents=[remote], help="fit a Laplace posterior (a job on the workers)")
    p_fit.add_argument("model")
    p_fit.add_argument("dataset")
    p_fit.add_argument("--validation", help="validation dataset id")
    p_fit.add_argument("--curvature", choices=[c.value for c in Curvature])
    p_fit.add_argument("--damping", choices=[d.value for d in Damping])
    p_fit.add_argument("--tuning", choices=[t.value for t in Tuning])
    p_fit.add_argument("--predictive", choices=[p.value for p in Predictive])
    p_fit.add_argument("--ood-score", choices=[s.value for s in OodScore])
    p_fit.add_argument("--samples", type=int, help="default MC samples of predictions")
    p_fit.add_argument("--seed", type=int)
    p_fit.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other fit option (JSON value)")
    p_fit.add_argument("--wait", action="store_true", help="follow the job with a progress bar")

    p_opt = sub.add_parser("optimise", parents=[remote], help="train a model with the second-order optimiser")
    p_opt.add_argument("model")
    p_opt.add_argument("dataset")
    p_opt.add_argument("--method", choices=[m.value for m in TrainingMethod])
    p_opt.add_argument("--likelihood", choices=[n.value for n in LikelihoodName])
    p_opt.add_argument("--steps", type=int)
    p_opt.add_argument("--epochs", type=int)
    p_opt.add_argument("--batch-size", type=int)
    p_opt.add_argument("--lr", type=float, help="adam / sgd only")
    p_opt.add_argument("--seed", type=int)
    p_opt.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other option (JSON value)")
    p_opt.add_argument("--wait", action="store_true", help="follow the job (loss beside the progress bar)")

    p_onl = sub.add_parser("online", parents=[remote], help="learn tasks in order with online Laplace")
    p_onl.add_argument("datasets", nargs="+", help="one dataset id per task, in order (each with x_val, y_val)")
    start = p_onl.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="uploaded classifier to start from")
    start.add_argument("--continue-from", help="a finished online job whose state to continue")
    p_onl.add_argument("--method", choices=[m.value for m in ContinualMethod])
    p_onl.add_argument("--curvature", choices=[c.value for c in Curvature])
    p_onl.add_argument("--strength", type=_option_value, help='a number, or "validation"')
    p_onl.add_argument("--epochs", type=int)
    p_onl.add_argument("--seed", type=int)
    p_onl.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other option (JSON value)")
    p_onl.add_argument("--wait", action="store_true", help="follow the job with a progress bar")

    p_art = sub.add_parser("artifact", parents=[remote], help="list a job's files, or download one")
    p_art.add_argument("job")
    p_art.add_argument("name", nargs="?", help="e.g. curve.png, accuracy.json (omit to list)")
    p_art.add_argument("--output", "-o", help="where to write it (default: its name)")

    p_fits = sub.add_parser("fits", help="list a model's fits or show one fit")
    fits = p_fits.add_subparsers(dest="action", required=True)
    fits.add_parser("list", parents=[remote], help="ready fits of a model").add_argument("id", help="model id")
    fits.add_parser("get", parents=[remote]).add_argument("id", help="fit id")

    p_jobs = sub.add_parser("jobs", help="list, show or cancel jobs")
    jobs = p_jobs.add_subparsers(dest="action", required=True)
    jobs.add_parser("list", parents=[remote]).add_argument("--limit", type=int, default=50)
    jobs.add_parser("get", parents=[remote]).add_argument("id")
    jobs.add_parser("cancel", parents=[remote]).add_argument("id")

    p_pred = sub.add_parser("predict", parents=[remote], help="predict for the inputs in an .npy or .npz file")
    p_pred.add_argument("model")
    p_pred.add_argument("file", help=".npy array, or .npz (array 'x' unless --key)")
    p_pred.add_argument("--key", help="array of the .npz to send")
    p_pred.add_argument("--samples", type=int)
    p_pred.add_argument("--predictive", choices=[p.value for p in Predictive])
    p_pred.add_argument("--ood-score", choices=[s.value for s in OodScore])
    p_pred.add_argument("--fit", help="fit id (default: the model's newest)")
    p_pred.add_argument("--seed", type=int)
    p_pred.add_argument("--output", "-o", help="write the JSON answer here instead of printing it")

    sub.add_parser("health", parents=[remote], help="liveness and readiness (no key needed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kronlap`` script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return serve(args.host, args.port, args.example, log_level=args.log_level)
    if args.command == "worker":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from workers.runner import run_worker

        return run_worker()
    try:
        return _run_client_command(args)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.detail is not None:
            print(json.dumps(exc.detail, indent=2), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
