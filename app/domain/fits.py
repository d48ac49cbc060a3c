"""Fits: storing a fitted posterior so the API can serve it."""

from __future__ import annotations

from typing import Any

import curvature as cv
from app.domain.backend import Backend
from app.domain.catalog import FitRecord
from curvature.options import Predictive


def threshold_table(posterior: cv.LaplacePosterior) -> dict[str, dict[str, float]]:
    """OOD thresholds by predictive, then by score: the predictives the fit calibrated (its own always)."""
    return {
        str(p): {str(s): float(v) for s, v in t.items()}
        for p, t in posterior.ood_table.items()
        if p in tuple(Predictive) and t
    }


def save_fit(backend: Backend, posterior: cv.LaplacePosterior, **record: Any) -> FitRecord:
    """Stores the posterior's bytes (content-addressed), writes its fit record, caches it in Redis and makes it
    the model's latest fit.

    Args:
        backend: Store, catalog and cache.
        posterior: The fitted posterior (its OOD thresholds calibrated).
        record: The :class:`FitRecord` fields other than the posterior's (``id``, ``tenant``, ``model_id``,
            ``dataset_id``, ``config``, ``ood_score``, ...).
    """
    summary = posterior.summary()
    # Phase timings differ between two runs of the same fit; they go on the record, not into the
    # content-addressed bytes, so a redelivered fit stores the same blob.
    timings = posterior.metadata.pop("timings", None)
    try:
        blob = posterior.to_bytes()
    finally:
        if timings is not None:
            posterior.metadata["timings"] = timings
    fit = FitRecord(
        posterior_sha256=backend.store.put_blob(blob),
        size_bytes=len(blob),
        ood_thresholds=threshold_table(posterior),
        summary=summary if isinstance(summary, dict) else {},
        **record,
    )
    backend.catalog.put_fit(fit)
    backend.cache.put(fit.id, blob)
    backend.cache.set_latest(fit.model_id, fit.id)
    return fit
