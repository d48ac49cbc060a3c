"""Dataset upload (``.npz``, never unpickled), lookup and deletion."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status

from app.catalog import DatasetRecord, new_id
from app.datasetio import Dataset, parse_npz
from app.deps import ServicesDep, TenantDep
from app.errors import PayloadTooLarge
from app.schemas import ERROR_RESPONSES, DatasetOut
from app.services import Services

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def store_dataset(
    services: Services, tenant: str, data: Dataset, name: str | None = None, dataset_id: str | None = None
) -> DatasetRecord:
    """Writes a checked dataset in canonical form and records it."""
    blob = data.to_npz()
    sha = services.store.put_blob(blob)
    record = DatasetRecord(
        id=dataset_id or new_id("ds"),
        tenant=tenant,
        name=name,
        sha256=sha,
        size_bytes=len(blob),
        n=int(data.x.shape[0]),
        n_val=int(data.x_val.shape[0]) if data.x_val is not None else 0,
        x_shape=list(data.x.shape[1:]),
        y_shape=list(data.y.shape[1:]),
        y_kind=data.y_kind,
        num_classes=data.num_classes,
    )
    services.catalog.put_dataset(record)
    return record


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
    record = services.catalog.get_dataset(dataset_id, tenant)
    services.catalog.delete_dataset(dataset_id, tenant)
    if record.sha256 not in services.store.referenced_blobs():
        services.store.delete_blob(record.sha256)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
