"""Request and response bodies of the HTTP API (pydantic v2)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.domain.catalog import DatasetRecord, FitRecord, ModelRecord
from app.domain.jobs import JobRecord, JobStatus
from curvature.options import MAX_SEED, Curvature, OodScore, Predictive, Task


class ErrorInfo(BaseModel):
    """The body of every error response is ``{"error": ErrorInfo}``."""

    code: str
    message: str
    detail: Any = None


class ErrorResponse(BaseModel):
    """Error envelope."""

    error: ErrorInfo


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed body (unparseable JSON or multipart)",
    401: "Missing or unknown API key",
    403: "Not allowed: the service runs without API keys and answers loopback clients only",
    404: "Unknown id (or owned by another tenant)",
    409: "Conflicts with the current state",
    413: "Body or file too large",
    415: "Unsupported content type or file format",
    422: "Invalid input",
    501: "Not available in this version",
    503: "Redis unreachable; retry after the Retry-After header's seconds",
}
"""What each error status means, for the OpenAPI document."""

RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def error_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, each with the error envelope as its body.

    Args:
        statuses: The statuses.
        descriptions: Route-specific descriptions by status, as ``s409="No fit yet"``.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": ErrorResponse,
            "description": descriptions.get(f"s{status}", ERROR_DESCRIPTIONS[status]),
        }
        if status == 503:
            entry["headers"] = RETRY_AFTER_HEADER
        out[status] = entry
    return out


ERROR_RESPONSES = error_responses(401, 404, 413, 422)

MAX_SAMPLES = 1_000_000
"""Ceiling of ``samples`` in the schema; the configured ``max_predict_samples`` applies below it."""


class ModelOut(BaseModel):
    """A registered model."""

    id: str
    name: str | None
    task: Task
    format: str
    filename: str
    input_shape: list[int]
    output_dim: int
    output_activation: str | None
    class_names: list[str] | None
    curvatures: list[Curvature] | None = Field(default=None, description="Curvatures that can be fitted on it.")
    parent: dict[str, str] | None = Field(default=None, description="The model and job that produced it.")
    sha256: str
    size_bytes: int
    created_at: float
    links: dict[str, str]

    @classmethod
    def of(cls, record: ModelRecord) -> ModelOut:
        """Builds the response from a record."""
        return cls(
            **record.model_dump(exclude={"tenant"}),
            links={
                "self": f"/v1/models/{record.id}",
                "fits": f"/v1/models/{record.id}/fits",
                "predict": f"/v1/models/{record.id}/predict",
            },
        )


class DatasetOut(BaseModel):
    """A registered dataset."""

    id: str
    name: str | None
    n: int
    n_val: int
    x_shape: list[int]
    y_shape: list[int]
    y_kind: str
    num_classes: int | None
    sha256: str
    size_bytes: int
    created_at: float

    @classmethod
    def of(cls, record: DatasetRecord) -> DatasetOut:
        """Builds the response from a record."""
        return cls(**record.model_dump(exclude={"tenant"}))


class JobOut(BaseModel):
    """A job's state."""

    id: str
    kind: str
    status: JobStatus
    progress: float
    message: str
    attempts: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    details: dict[str, Any] | None = Field(default=None, description="Kind-specific live fields (step, loss, ...).")
    worker_lost: bool = Field(
        default=False, description="The running job's worker stopped heart-beating; the job will be re-delivered."
    )
    worker: dict[str, Any] | None = Field(
        default=None, description="Liveness of a running job's worker: id, alive, last_beat, retry_at (epoch s)."
    )
    links: dict[str, str]

    @classmethod
    def of(cls, job: JobRecord) -> JobOut:
        """Builds the response from a record."""
        links = {"self": f"/v1/jobs/{job.id}"}
        fit_id = job.params.get("fit_id")
        if fit_id:
            links["fit"] = f"/v1/fits/{fit_id}"
        return cls(
            **job.model_dump(mode="json", exclude={"tenant", "params"}),
            links=links,
        )


class JobSubmitted(BaseModel):
    """Answer of a job submission (202): the queued job and where to follow it."""

    job: JobOut
    links: dict[str, str]

    @classmethod
    def of(cls, job: JobRecord) -> JobSubmitted:
        """Builds the answer from the new record."""
        return cls(job=JobOut.of(job), links={"job": f"/v1/jobs/{job.id}"})


class FitSubmitted(BaseModel):
    """Answer of a fit submission (202)."""

    fit_id: str
    job: JobOut
    links: dict[str, str]


class FitOut(BaseModel):
    """A fit: ready (from the store) or in progress (from its job)."""

    id: str
    model_id: str
    status: JobStatus
    dataset_id: str | None = None
    validation_id: str | None = None
    job_id: str | None = None
    config: dict[str, Any] = {}
    ood_score: str | None = None
    ood_thresholds: dict[str, dict[str, float]] = {}
    summary: dict[str, Any] = {}
    size_bytes: int | None = None
    device: str | None = None
    duration_s: float | None = None
    created_at: float | None = None
    progress: float | None = None
    error: dict[str, Any] | None = None
    links: dict[str, str] = {}

    @classmethod
    def of(cls, record: FitRecord) -> FitOut:
        """A ready fit."""
        data = record.model_dump(exclude={"tenant", "posterior_sha256"})
        links = {"self": f"/v1/fits/{record.id}", "model": f"/v1/models/{record.model_id}"}
        if record.job_id:
            links["job"] = f"/v1/jobs/{record.job_id}"
        return cls(**data, status=JobStatus.succeeded, progress=1.0, links=links)

    @classmethod
    def pending(cls, fit_id: str, job: JobRecord) -> FitOut:
        """A fit whose job has not produced it (yet)."""
        p = job.params
        return cls(
            id=fit_id,
            model_id=p.get("model_id", ""),
            status=job.status,
            dataset_id=p.get("dataset_id"),
            validation_id=p.get("validation_id"),
            job_id=job.id,
            config=p.get("config", {}),
            ood_score=p.get("config", {}).get("ood_score"),
            progress=job.progress,
            error=job.error,
            created_at=job.created_at,
            links={"self": f"/v1/fits/{fit_id}", "job": f"/v1/jobs/{job.id}"},
        )


class PredictRequest(BaseModel):
    """Body of ``POST /v1/models/{id}/predict``.

    ``inputs`` is a batch: a list of inputs each shaped like the model's ``input_shape`` (or flattened).
    The same options may instead be sent as query parameters with an ``application/x-npy`` body holding
    the batch as one float array (no pickles).
    """

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(description="Batch of inputs, e.g. [[0.0, 0.1, ...], ...].")
    samples: int | None = Field(
        default=None, ge=1, le=MAX_SAMPLES, description="MC samples (default: the fit's setting)."
    )
    predictive: Predictive | None = Field(default=None, description="mc or glm (default: the fit's setting).")
    ood_score: OodScore | None = Field(default=None, description="Score used for the OOD flag.")
    fit: str | None = Field(default=None, max_length=128, description="Fit id (default: the model's newest fit).")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Seed for reproducible sampling.")


class PredictOptionsIn(BaseModel):
    """The options of :class:`PredictRequest` without ``inputs`` (checked separately, fast)."""

    model_config = ConfigDict(extra="forbid")

    samples: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    predictive: Predictive | None = None
    ood_score: OodScore | None = None
    fit: str | None = Field(default=None, max_length=128)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class PredictResult(BaseModel):
    """Per-input result (classification fields or regression fields)."""

    probs: list[float] | None = None
    predicted_class: int | None = None
    predicted_label: str | None = None
    entropy: float | None = None
    expected_entropy: float | None = None
    mutual_information: float | None = None
    max_prob: float | None = None
    mean: list[float] | float | None = None
    variance: list[float] | float | None = None
    aleatoric_variance: list[float] | float | None = None
    epistemic_variance: list[float] | float | None = None
    ood_score: float
    ood: bool
    ood_threshold: float | None = Field(description="null when the fit has no threshold for this predictive")


class PredictResponse(BaseModel):
    """Answer of a predict request."""

    model: str
    fit: str
    task: Task
    predictive: Predictive
    samples: int
    ood_score: OodScore
    ood_threshold: float | None
    results: list[PredictResult]
