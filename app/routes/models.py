"""Model upload, lookup and deletion."""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.catalog import ModelRecord, new_id
from app.deps import ServicesDep, TenantDep
from app.errors import InvalidInput, PayloadTooLarge
from app.schemas import ERROR_RESPONSES, FitOut, ModelOut
from app.services import Services

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelMetadata(BaseModel):
    """Metadata sent with a model file."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["classification", "regression"] = "classification"
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1, max_length=8)
    class_names: list[str] | None = None
    name: str | None = Field(default=None, max_length=200)


def _parse_list(raw: str, field: str) -> list:
    text = raw.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{field} is not valid JSON", code="validation_error") from exc
        if not isinstance(value, list):
            raise InvalidInput(f"{field} must be a list", code="validation_error")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _metadata(
    metadata: str | None, task: str | None, input_shape: str | None, class_names: str | None, name: str | None
) -> ModelMetadata:
    fields: dict = {}
    if metadata:
        try:
            fields = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise InvalidInput("metadata is not valid JSON", code="validation_error") from exc
        if not isinstance(fields, dict):
            raise InvalidInput("metadata must be a JSON object", code="validation_error")
    if task is not None:
        fields["task"] = task
    if input_shape is not None:
        fields["input_shape"] = _parse_list(input_shape, "input_shape")
    if class_names is not None:
        fields["class_names"] = _parse_list(class_names, "class_names")
    if name is not None:
        fields["name"] = name
    try:
        return ModelMetadata.model_validate(fields)
    except ValidationError as exc:
        raise InvalidInput(
            "invalid model metadata",
            code="validation_error",
            detail=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()],
        ) from exc


def _register(
    services: Services, tenant: str, data: bytes, filename: str, meta: ModelMetadata, model_id: str | None = None
) -> ModelRecord:
    from app.modelio import load_model

    settings = services.settings
    imported = load_model(
        data,
        filename,
        input_shape=tuple(meta.input_shape) if meta.input_shape else None,
        max_bytes=settings.max_model_bytes,
    )
    if meta.task == "classification" and imported.output_dim < 2:
        raise InvalidInput(
            f"a classifier needs at least 2 outputs, the model has {imported.output_dim}", code="invalid_model"
        )
    if meta.class_names is not None and len(meta.class_names) != imported.output_dim:
        raise InvalidInput(
            f"{len(meta.class_names)} class names for {imported.output_dim} outputs",
            code="invalid_metadata",
            detail={"class_names": len(meta.class_names), "output_dim": imported.output_dim},
        )
    if meta.task == "regression" and meta.class_names:
        raise InvalidInput("class_names only apply to classification", code="invalid_metadata")
    sha = services.store.put_blob(data)
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
    )
    services.catalog.put_model(record)
    return record


def register_model(
    services: Services,
    tenant: str,
    data: bytes,
    filename: str,
    task: str = "classification",
    input_shape: list[int] | None = None,
    class_names: list[str] | None = None,
    name: str | None = None,
    model_id: str | None = None,
) -> ModelRecord:
    """Imports (dry-runs) and stores a model; the code path of ``POST /v1/models``.

    Raises:
        app.modelio.ModelImportError: The file is not an importable model.
        InvalidInput: Metadata inconsistent with the model.
    """
    meta = ModelMetadata(task=task, input_shape=input_shape, class_names=class_names, name=name)
    return _register(services, tenant, data, filename, meta, model_id=model_id)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelOut,
    responses={**ERROR_RESPONSES, 415: ERROR_RESPONSES[422] | {"description": "Unknown model format"}},
)
def upload_model(
    services: ServicesDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="ONNX (.onnx) or torch.export (.pt2) file.")],
    task: Annotated[Literal["classification", "regression"] | None, Form()] = None,
    input_shape: Annotated[str | None, Form(description="Per-example shape, e.g. [1,28,28] or 784.")] = None,
    class_names: Annotated[str | None, Form(description="JSON list or comma-separated names.")] = None,
    name: Annotated[str | None, Form()] = None,
    metadata: Annotated[str | None, Form(description="JSON object with the same fields.")] = None,
) -> ModelOut:
    """Uploads a trained network; it is imported and dry-run before anything is stored."""
    meta = _metadata(metadata, task, input_shape, class_names, name)
    limit = services.settings.max_model_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the model file exceeds {limit} bytes", detail={"limit_bytes": limit})
    filename = PurePath(file.filename or "model").name
    record = _register(services, tenant, data, filename, meta)
    return ModelOut.of(record)


@router.get("", response_model=list[ModelOut])
def list_models(services: ServicesDep, tenant: TenantDep) -> list[ModelOut]:
    """The caller's models, newest first."""
    return [ModelOut.of(r) for r in services.catalog.models(tenant)]


@router.get("/{model_id}", response_model=ModelOut, responses=ERROR_RESPONSES)
def get_model(model_id: str, services: ServicesDep, tenant: TenantDep) -> ModelOut:
    """One model."""
    return ModelOut.of(services.catalog.get_model(model_id, tenant))


@router.get("/{model_id}/fits", response_model=list[FitOut], responses=ERROR_RESPONSES)
def list_fits(model_id: str, services: ServicesDep, tenant: TenantDep) -> list[FitOut]:
    """Ready fits of a model, newest first."""
    services.catalog.get_model(model_id, tenant)
    return [FitOut.of(f) for f in services.catalog.fits_of(model_id) if f.tenant == tenant]


def _delete(services: Services, model_id: str, tenant: str) -> list[str]:
    model = services.catalog.get_model(model_id, tenant)
    fits = services.catalog.fits_of(model_id)
    fit_ids = services.catalog.delete_model(model_id, tenant)
    services.cache.delete(*fit_ids)
    services.cache.forget_latest(model_id)
    referenced = services.store.referenced_blobs()
    for sha in {model.sha256, *(f.posterior_sha256 for f in fits)}:
        if sha not in referenced:
            services.store.delete_blob(sha)
    return fit_ids


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERROR_RESPONSES)
async def delete_model(model_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    """Deletes a model, its fits and their cached posteriors."""
    fit_ids = await run_in_threadpool(_delete, services, model_id, tenant)
    services.predictors.evict(*fit_ids)
    services.predictors.forget_model(model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
