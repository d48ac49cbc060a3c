"""Tenant-scoped records of models, datasets and fits on top of the :class:`~app.domain.store.ArtifactStore`.

A record names its bytes by sha256; the bytes live in the store's blob area. Looking up a record that belongs
to another tenant is indistinguishable from looking up one that does not exist (:class:`~app.domain.errors.NotFound`),
so ids leak nothing across tenants.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from app.domain.errors import NotFound
from app.domain.store import ArtifactStore, valid_id
from curvature.options import Curvature, Task


def new_id(prefix: str) -> str:
    """A fresh random id such as ``mdl_3f9c0a1b2c3d4e5f``."""
    return f"{prefix}_{secrets.token_hex(8)}"


class ModelRecord(BaseModel):
    """An uploaded network."""

    id: str
    tenant: str
    name: str | None = None
    filename: str
    format: str
    sha256: str
    size_bytes: int
    task: Task
    input_shape: list[int]
    output_dim: int
    output_activation: str | None = None
    class_names: list[str] | None = None
    curvatures: list[Curvature] | None = Field(
        default=None, description="Curvatures the core can fit on this network (None: not recorded)."
    )
    parent: dict[str, str] | None = Field(default=None, description="Lineage: the model and job that produced it.")
    created_at: float = Field(default_factory=time.time)


class DatasetRecord(BaseModel):
    """An uploaded dataset, stored in canonical form (``x`` float32, ``y`` int64 or float32)."""

    id: str
    tenant: str
    name: str | None = None
    sha256: str
    size_bytes: int
    n: int
    n_val: int = 0
    x_shape: list[int]
    y_shape: list[int]
    y_kind: Literal["int", "float", "none"]
    num_classes: int | None = None
    x_range: list[float] | None = Field(default=None, description="Smallest and largest input value.")
    y_range: list[float] | None = Field(default=None, description="Smallest and largest target value.")
    created_at: float = Field(default_factory=time.time)


class FitRecord(BaseModel):
    """A fitted Laplace posterior for a model."""

    id: str
    tenant: str
    model_id: str
    dataset_id: str
    validation_id: str | None = None
    job_id: str | None = None
    config: dict[str, Any]
    posterior_sha256: str
    size_bytes: int
    ood_score: str
    ood_thresholds: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Calibrated OOD thresholds by predictive (mc, glm), then by score."
    )
    summary: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"
    duration_s: float = 0.0
    created_at: float = Field(default_factory=time.time)

    @field_validator("ood_thresholds", mode="before")
    @classmethod
    def _nest_flat_thresholds(cls, value: Any, info: ValidationInfo) -> Any:
        # Records written before thresholds were kept per predictive hold {score: value}.
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            predictive = str((info.data.get("config") or {}).get("predictive", "mc"))
            return {predictive: value}
        return value


class Catalog:
    """Typed, tenant-checked access to the records of an :class:`ArtifactStore`.

    Args:
        store: The artifact store.
    """

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def _get(self, kind: str, cls: type, record_id: str, tenant: str | None, label: str) -> Any:
        raw = self.store.get_record(kind, record_id) if valid_id(record_id) else None
        if raw is None or (tenant is not None and raw.get("tenant") != tenant):
            raise NotFound(f"{label} {record_id!r} not found", detail={label: record_id})
        return cls.model_validate(raw)

    # models
    def get_model(self, model_id: str, tenant: str | None) -> ModelRecord:
        """Returns the model record, raising :class:`NotFound` if absent or owned by another tenant."""
        return self._get("models", ModelRecord, model_id, tenant, "model")

    def put_model(self, record: ModelRecord) -> None:
        """Writes (or overwrites) a model record."""
        self.store.put_record("models", record.id, record.model_dump())

    def delete_model(self, model_id: str, tenant: str | None) -> list[str]:
        """Deletes a model and its fits; returns the ids of the deleted fits."""
        self.get_model(model_id, tenant)
        fit_ids = [fit.id for fit in self.fits_of(model_id)]
        for fit_id in fit_ids:
            self.store.delete_record("fits", fit_id)
        self.store.delete_record("models", model_id)
        return fit_ids

    def models(self, tenant: str) -> list[ModelRecord]:
        """The tenant's models, newest first."""
        found = [ModelRecord.model_validate(r) for r in self.store.records("models") if r.get("tenant") == tenant]
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    # datasets
    def get_dataset(self, dataset_id: str, tenant: str | None) -> DatasetRecord:
        """Returns the dataset record, raising :class:`NotFound` if absent or owned by another tenant."""
        return self._get("datasets", DatasetRecord, dataset_id, tenant, "dataset")

    def put_dataset(self, record: DatasetRecord) -> None:
        """Writes (or overwrites) a dataset record."""
        self.store.put_record("datasets", record.id, record.model_dump())

    def datasets(self, tenant: str) -> list[DatasetRecord]:
        """The tenant's datasets, newest first."""
        found = [DatasetRecord.model_validate(r) for r in self.store.records("datasets") if r.get("tenant") == tenant]
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    def delete_dataset(self, dataset_id: str, tenant: str | None) -> None:
        """Deletes a dataset record (fits made from it stay usable)."""
        self.get_dataset(dataset_id, tenant)
        self.store.delete_record("datasets", dataset_id)

    # fits
    def get_fit(self, fit_id: str, tenant: str | None) -> FitRecord:
        """Returns the fit record, raising :class:`NotFound` if absent or owned by another tenant."""
        return self._get("fits", FitRecord, fit_id, tenant, "fit")

    def find_fit(self, fit_id: str, tenant: str | None) -> FitRecord | None:
        """Like :meth:`get_fit` but returns ``None`` instead of raising."""
        try:
            return self.get_fit(fit_id, tenant)
        except NotFound:
            return None

    def put_fit(self, record: FitRecord) -> None:
        """Writes (or overwrites) a fit record."""
        self.store.put_record("fits", record.id, record.model_dump())

    def fits_of(self, model_id: str) -> list[FitRecord]:
        """Fits of a model, newest first."""
        found = [FitRecord.model_validate(r) for r in self.store.records("fits") if r.get("model_id") == model_id]
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    def latest_fit(self, model_id: str) -> FitRecord | None:
        """The newest fit of a model, if any."""
        fits = self.fits_of(model_id)
        return fits[0] if fits else None
