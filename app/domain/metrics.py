"""Prometheus metrics, all prefixed ``kronlap_`` with units in their names.

One :class:`Metrics` instance per process (:func:`get_metrics`) on prometheus-client's default registry, so
an embedded worker's job metrics appear on the API's ``/metrics``; a stand-alone worker exposes its own
exporter (``KRONLAP_WORKER_METRICS_PORT``). The HTTP middleware times every request by route
template and model id (:mod:`app.api.metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SAMPLE_BUCKETS = (1, 10, 20, 50, 100, 200, 500, 1000)
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600)


class Metrics:
    """The service's metric families.

    Args:
        registry: Registry to register on (the default registry in production).
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.http_requests = Counter(
            "kronlap_http_requests_total",
            "HTTP requests by route template, method, status and model.",
            ["route", "method", "status", "model"],
            registry=registry,
        )
        self.http_latency = Histogram(
            "kronlap_http_request_duration_seconds",
            "HTTP request latency by route template, method and model.",
            ["route", "method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.predict_request_inputs = Histogram(
            "kronlap_predict_request_inputs",
            "Inputs per predict request.",
            ["model"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.predict_batch_inputs = Histogram(
            "kronlap_predict_batch_inputs",
            "Inputs per micro-batch passed to the posterior.",
            ["model"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.predict_batch_requests = Histogram(
            "kronlap_predict_batch_requests",
            "Requests merged into one micro-batch.",
            ["model"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.predict_mc_samples = Histogram(
            "kronlap_predict_mc_samples",
            "Monte-Carlo samples requested per predict call.",
            ["model", "predictive"],
            buckets=SAMPLE_BUCKETS,
            registry=registry,
        )
        self.predict_compute = Histogram(
            "kronlap_predict_compute_duration_seconds",
            "Time spent in the posterior's predict per micro-batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.predict_inputs = Counter(
            "kronlap_predict_inputs_total",
            "Inputs scored, by model and OOD flag.",
            ["model", "ood"],
            registry=registry,
        )
        self.predictor_loads = Counter(
            "kronlap_predictor_loads_total",
            "Posteriors loaded into the API, by source (redis or store).",
            ["source"],
            registry=registry,
        )
        self.jobs = Counter(
            "kronlap_jobs_total",
            "Finished job executions by kind and outcome (succeeded, failed, cancelled, retried).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.job_duration = Histogram(
            "kronlap_job_duration_seconds",
            "Job execution time by kind and outcome.",
            ["kind", "outcome"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.jobs_submitted = Counter(
            "kronlap_jobs_submitted_total", "Jobs submitted through the API.", ["kind"], registry=registry
        )
        self.train_steps = Counter(
            "kronlap_train_steps_total", "Training steps taken by jobs, by kind and method.", ["kind", "method"],
            registry=registry,
        )
        self.train_step_rate = Gauge(
            "kronlap_train_steps_per_second",
            "Steps per second of the latest running training job, by kind and method.",
            ["kind", "method"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "kronlap_queue_depth_messages", "Messages waiting in a job queue.", ["queue"], registry=registry
        )
        self.worker_device = Gauge(
            "kronlap_worker_device_info",
            "The compute device of this worker process (always 1), by device (cpu, cuda:0) and its name.",
            ["device", "name"],
            registry=registry,
        )


@lru_cache
def get_metrics() -> Metrics:
    """The process-wide :class:`Metrics` on the default registry."""
    return Metrics()


def timed(histogram: Histogram, **labels: Any) -> Callable[[], float]:
    """Starts a timer; calling the returned function observes and returns the elapsed seconds."""
    start = time.perf_counter()

    def stop() -> float:
        elapsed = time.perf_counter() - start
        histogram.labels(**labels).observe(elapsed)
        return elapsed

    return stop
