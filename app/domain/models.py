"""Models: importing and registering uploads, deleting them with their fits."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.domain.backend import Backend
from app.domain.catalog import ModelRecord, new_id
from app.domain.errors import InvalidInput
from app.domain.modelio import load_model
from curvature import supported_curvatures
from curvature.options import Curvature, Task


class ModelMetadata(BaseModel):
    """Metadata sent with a model file."""

    model_config = ConfigDict(extra="forbid")

    task: Task = Task.classification
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1, max_length=8)
    class_names: list[str] | None = None
    name: str | None = Field(default=None, max_length=200)


def register_model(
    backend: Backend,
    tenant: str,
    data: bytes,
    filename: str,
    meta: ModelMetadata,
    model_id: str | None = None,
    parent: dict[str, str] | None = None,
) -> ModelRecord:
    """Imports (dry-runs) and stores a model; the code path of ``POST /v1/models``.

    Args:
        backend: Store and catalog.
        tenant: Owner.
        data: The uploaded file.
        filename: Its name (the format is detected from the bytes, the name is a fallback).
        meta: Task, input shape, class names, display name.
        model_id: Fixed id (the example model), else a fresh one.
        parent: Lineage of a model produced by a job (``{"model": ..., "job": ...}``).

    Raises:
        app.domain.modelio.ModelImportError: The file is not an importable model.
        InvalidInput: Metadata inconsistent with the model.
    """
    imported = load_model(
        data,
        filename,
        input_shape=tuple(meta.input_shape) if meta.input_shape else None,
        max_bytes=backend.settings.max_model_bytes,
    )
    if meta.task == Task.classification and imported.output_dim < 2:
        raise InvalidInput(
            f"a classifier needs at least 2 outputs, the model has {imported.output_dim}", code="invalid_model"
        )
    if meta.class_names is not None and len(meta.class_names) != imported.output_dim:
        raise InvalidInput(
            f"{len(meta.class_names)} class names for {imported.output_dim} outputs",
            code="invalid_metadata",
            detail={"class_names": len(meta.class_names), "output_dim": imported.output_dim},
        )
    if meta.task == Task.regression and meta.class_names:
        raise InvalidInput("class_names only apply to classification", code="invalid_metadata")
    sha = backend.store.put_blob(data)
    record = ModelRecord(
        id=model_id or new_id("mdl"),
        tenant=tenant,
        name=meta.name,
        filename=filename,
        format=imported.format,
        sha256=sha,
        size_bytes=len(data),
        task=meta.task,
        input_shape=list(imported.input_shape),
        output_dim=imported.output_dim,
        output_activation=imported.output_activation,
        class_names=meta.class_names,
        curvatures=list(supported_curvatures(imported.module)),
        parent=parent,
    )
    backend.catalog.put_model(record)
    return record


def delete_model(backend: Backend, tenant: str, model_id: str) -> list[str]:
    """Deletes a model, its fits and their cached posteriors; returns the deleted fits' ids."""
    model = backend.catalog.get_model(model_id, tenant)
    fits = backend.catalog.fits_of(model_id)
    fit_ids = backend.catalog.delete_model(model_id, tenant)
    backend.cache.delete(*fit_ids)
    backend.cache.forget_latest(model_id)
    referenced = backend.store.referenced_blobs()
    for sha in {model.sha256, *(f.posterior_sha256 for f in fits)}:
        if sha not in referenced:
            backend.store.delete_blob(sha)
    return fit_ids


_WHY_UNSUPPORTED = {Curvature.kfra: "KFRA needs a chain of Linear layers with element-wise activations"}


def require_curvature(model: ModelRecord, curvature: Curvature) -> None:
    """Checks that the core can fit ``curvature`` on the model (records from before curvatures were recorded
    pass; the core then decides).

    Raises:
        InvalidInput: With code ``unsupported_curvature`` and the supported curvatures in its detail.
    """
    if model.curvatures is None or curvature in model.curvatures:
        return
    raise InvalidInput(
        f"curvature {curvature.value!r} cannot be fitted on model {model.id!r}: "
        + _WHY_UNSUPPORTED.get(curvature, "not supported for its layers"),
        code="unsupported_curvature",
        detail={"curvature": curvature.value, "supported": [c.value for c in model.curvatures]},
    )
