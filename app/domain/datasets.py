"""Datasets: storing checked uploads, deleting them, and whether one fits a model."""

from __future__ import annotations

import math

from app.domain.backend import Backend
from app.domain.catalog import DatasetRecord, ModelRecord, new_id
from app.domain.datasetio import Dataset
from app.domain.errors import InvalidInput
from curvature.options import Task


def store_dataset(
    backend: Backend, tenant: str, data: Dataset, name: str | None = None, dataset_id: str | None = None
) -> DatasetRecord:
    """Writes a checked dataset in canonical form and records it; the code path of ``POST /v1/datasets``."""
    blob = data.to_npz()
    sha = backend.store.put_blob(blob)
    record = DatasetRecord(
        id=dataset_id or new_id("ds"),
        tenant=tenant,
        name=name,
        sha256=sha,
        size_bytes=len(blob),
        n=int(data.x.shape[0]),
        n_val=int(data.x_val.shape[0]) if data.x_val is not None else 0,
        x_shape=list(data.x.shape[1:]),
        y_shape=list(data.y.shape[1:]) if data.y is not None else [],
        y_kind=data.y_kind,
        num_classes=data.num_classes,
        x_range=[float(data.x.min()), float(data.x.max())],
        y_range=[float(data.y.min()), float(data.y.max())] if data.y is not None and data.y.size else None,
    )
    backend.catalog.put_dataset(record)
    return record


def delete_dataset(backend: Backend, tenant: str, dataset_id: str) -> None:
    """Deletes a dataset record, and its bytes unless another record names them; fits stay usable."""
    record = backend.catalog.get_dataset(dataset_id, tenant)
    backend.catalog.delete_dataset(dataset_id, tenant)
    if record.sha256 not in backend.store.referenced_blobs():
        backend.store.delete_blob(record.sha256)


def check_rows(model: ModelRecord, data: DatasetRecord, label: str = "dataset") -> None:
    """Checks that a dataset's rows are the model's inputs (same shape, or the same size flattened).

    Raises:
        InvalidInput: With code ``incompatible_dataset``.
    """
    if data.x_shape != model.input_shape and math.prod(data.x_shape) != math.prod(model.input_shape):
        raise InvalidInput(
            f"{label} {data.id!r} has rows of shape {data.x_shape}; model {model.id!r} expects {model.input_shape}",
            code="incompatible_dataset",
        )


def check_compatible(model: ModelRecord, data: DatasetRecord, label: str = "dataset") -> None:
    """Checks that a dataset fits a model: row size, target kind, label range or target width.

    Raises:
        InvalidInput: With code ``incompatible_dataset``.
    """
    check_rows(model, data, label)
    if data.y_kind == "none":
        raise InvalidInput(
            f"{label} {data.id!r} has no targets y; this job needs labelled data", code="incompatible_dataset"
        )
    if model.task == Task.classification:
        if data.y_kind != "int":
            raise InvalidInput(
                f"{label} {data.id!r} has float targets; a classifier needs integer labels", code="incompatible_dataset"
            )
        if (data.num_classes or 0) > model.output_dim:
            raise InvalidInput(
                f"{label} {data.id!r} has labels up to {data.num_classes - 1}; the model has {model.output_dim} outputs",
                code="incompatible_dataset",
            )
    else:
        width = data.y_shape[0] if data.y_shape else 1
        if data.y_kind != "float" or width != model.output_dim:
            raise InvalidInput(
                f"{label} {data.id!r}: a regressor with {model.output_dim} outputs needs float targets of that width",
                code="incompatible_dataset",
            )
