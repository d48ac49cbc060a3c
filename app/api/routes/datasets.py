"""Dataset upload (``.npz``, never unpickled), lookup and deletion."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status

from app.api.deps import ServicesDep, TenantDep
from app.api.schemas import ERROR_RESPONSES, DatasetOut
from app.domain.datasetio import parse_npz
from app.domain.datasets import delete_dataset as delete_dataset_record
from app.domain.datasets import store_dataset
from app.domain.errors import PayloadTooLarge

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut, responses=ERROR_RESPONSES)
def upload_dataset(
    services: ServicesDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description=".npz with x, y and optionally x_val, y_val")],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> DatasetOut:
    """Uploads training (and optionally validation) data; checked before anything is stored."""
    limit = services.settings.max_upload_bytes
    raw = file.file.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"the dataset file exceeds {limit} bytes", detail={"limit_bytes": limit})
    data = parse_npz(raw, services.settings.max_dataset_bytes)
    return DatasetOut.of(store_dataset(services, tenant, data, name))


@router.get("", response_model=list[DatasetOut])
def list_datasets(services: ServicesDep, tenant: TenantDep) -> list[DatasetOut]:
    """The caller's datasets, newest first."""
    return [DatasetOut.of(r) for r in services.catalog.datasets(tenant)]


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ERROR_RESPONSES)
def get_dataset(dataset_id: str, services: ServicesDep, tenant: TenantDep) -> DatasetOut:
    """One dataset."""
    return DatasetOut.of(services.catalog.get_dataset(dataset_id, tenant))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERROR_RESPONSES)
def delete_dataset(dataset_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    """Deletes a dataset record; fits made from it stay usable."""
    delete_dataset_record(services, tenant, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
