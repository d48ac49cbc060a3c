"""Model upload, lookup and deletion."""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from app.api.deps import ServicesDep, TenantDep
from app.api.limits import json_too_deep
from app.api.schemas import ERROR_RESPONSES, FitOut, ModelOut
from app.domain.errors import InvalidInput, PayloadTooLarge
from app.domain.models import ModelMetadata, register_model
from app.domain.models import delete_model as delete_model_and_fits
from curvature.options import Task

router = APIRouter(prefix="/v1/models", tags=["models"])


FORM_JSON_DEPTH = 4
"""Deepest nesting accepted in a JSON form field (metadata is an object of lists)."""


def _loads(text: str, field: str) -> object:
    if json_too_deep(text.encode(), FORM_JSON_DEPTH):
        raise InvalidInput(f"{field} nests deeper than {FORM_JSON_DEPTH} levels", code="json_too_deep")
    return json.loads(text)


def _parse_list(raw: str, field: str) -> list:
    text = raw.strip()
    if text.startswith("["):
        try:
            value = _loads(text, field)
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
            fields = _loads(metadata, "metadata")
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
    task: Annotated[Task | None, Form()] = None,
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
    record = register_model(services, tenant, data, filename, meta)
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


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERROR_RESPONSES)
async def delete_model(model_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    """Deletes a model, its fits and their cached posteriors."""
    fit_ids = await run_in_threadpool(delete_model_and_fits, services, tenant, model_id)
    services.predictors.evict(*fit_ids)
    services.predictors.forget_model(model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
