"""Predictions with uncertainty and OOD flags.

The body is read and parsed here rather than by FastAPI's model binding: JSON batches are decoded with the
C JSON parser straight into a numpy array (no per-float validation), and ``application/x-npy`` bodies (one
float array, options in the query string) skip text parsing altogether. The schema in ``/docs`` is still
:class:`~app.api.schemas.PredictRequest`.

Nothing is allocated from what a body merely declares: a JSON body's nesting depth is checked before it is
parsed, and an npy header's shape and dtype are checked against the bytes that follow it and the input
limit before the array is viewed in place.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from app.api.deps import ServicesDep, TenantDep
from app.api.errors import validation_detail
from app.api.limits import json_too_deep, too_deep_error
from app.api.predictor import PredictOptions
from app.api.schemas import MAX_SAMPLES, PredictOptionsIn, PredictRequest, PredictResponse, error_responses
from app.api.services import Services
from app.domain.catalog import FitRecord, ModelRecord
from app.domain.datasetio import read_npy_header
from app.domain.errors import Conflict, InvalidInput, NotFound, UnsupportedMediaType
from curvature.options import MAX_SEED, OodScore, Predictive

router = APIRouter(prefix="/v1/models", tags=["predict"])

NPY_TYPES = ("application/x-npy", "application/octet-stream")
OFF_LOOP_BYTES = 1 << 20
"""Bodies larger than this are decoded on a worker thread, not on the event loop."""
OFF_LOOP_ROWS = 256
"""Answers with more rows than this are rendered on a worker thread."""
CLASSIFICATION_FIELDS = ("entropy", "expected_entropy", "mutual_information", "max_prob")
REGRESSION_FIELDS = ("mean", "variance", "aleatoric_variance", "epistemic_variance")

REQUEST_SCHEMAS = (PredictRequest,)
"""Models the request documentation names by reference; the app adds them to the OpenAPI components."""

_REQUEST_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "application/x-npy": {
                "schema": {"type": "string", "format": "binary"},
                "description": "numpy .npy of the input batch; options as query parameters",
            },
        },
    },
    "parameters": [
        {
            "name": n,
            "in": "query",
            "required": False,
            "schema": s,
            "description": "Only with an application/x-npy body.",
        }
        for n, s in (
            ("samples", {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES}),
            ("predictive", {"type": "string", "enum": [p.value for p in Predictive]}),
            ("ood_score", {"type": "string", "enum": [s.value for s in OodScore]}),
            ("fit", {"type": "string", "maxLength": 128}),
            ("seed", {"type": "integer", "minimum": 0, "maximum": MAX_SEED}),
        )
    ],
}


def _options(raw: dict[str, Any]) -> PredictOptionsIn:
    try:
        return PredictOptionsIn.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(
            "invalid predict options", code="validation_error", detail=validation_detail(exc.errors())
        ) from exc


def read_npy(body: bytes, max_inputs: int) -> np.ndarray:
    """Views an ``.npy`` body as an array, after checking its header against the bytes and the input limit.

    Only version 1.0 and 2.0 headers of plain numeric dtypes are read; the array is a view of ``body``.

    Raises:
        InvalidInput: Unreadable header, non-numeric dtype, a shape that disagrees with the byte count, or
            more inputs than ``max_inputs``.
    """
    buf = io.BytesIO(body)
    shape, fortran, dtype = read_npy_header(buf, code="invalid_npy")
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None or dtype.kind not in "fiub":
        raise InvalidInput(f"the .npy array must hold plain numbers, not {dtype}", code="invalid_npy")
    if shape and shape[0] > max_inputs:
        raise InvalidInput(
            f"{shape[0]} inputs in one request; the limit is {max_inputs}",
            code="too_many_inputs",
            detail={"limit": max_inputs},
        )
    count = math.prod(shape)
    offset = buf.tell()
    declared = count * dtype.itemsize
    if declared != len(body) - offset:
        raise InvalidInput(
            f"the .npy header declares shape {list(shape)} of {dtype} ({declared} bytes) but {len(body) - offset}"
            " bytes follow it",
            code="invalid_npy",
            detail={"shape": list(shape), "dtype": str(dtype), "declared_bytes": declared},
        )
    x = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return x.reshape(shape, order="F" if fortran else "C")


def parse_body(
    content_type: str, body: bytes, query: dict[str, str], max_inputs: int = 2**31, max_depth: int = 32
) -> tuple[np.ndarray, PredictOptionsIn]:
    """Decodes a predict body into the input batch and the options.

    Raises:
        InvalidInput: Malformed or too deeply nested JSON, malformed npy, missing or non-numeric inputs, bad
            options.
        UnsupportedMediaType: Neither JSON nor npy.
    """
    if content_type in NPY_TYPES:
        return read_npy(body, max_inputs), _options(query)
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"unsupported content type {content_type!r}; send application/json or application/x-npy"
        )
    if json_too_deep(body, max_depth):
        raise too_deep_error(max_depth)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InvalidInput(
            'body must be a JSON object with "inputs"',
            code="validation_error",
            detail=[{"loc": ["body", "inputs"], "msg": "Field required", "type": "missing"}],
        )
    inputs = payload.pop("inputs")
    options = _options(payload)
    if not isinstance(inputs, list):
        raise InvalidInput('"inputs" must be a list (a batch of inputs)', code="invalid_inputs")
    try:
        x = np.asarray(inputs)
    except ValueError as exc:
        raise InvalidInput("inputs are ragged: every input must have the same shape", code="invalid_shape") from exc
    return x, options


def check_inputs(x: np.ndarray, input_shape: list[int], max_inputs: int) -> np.ndarray:
    """Validates a batch against the model's per-example shape; returns it as contiguous float32.

    A batch of flattened inputs ``(B, prod(input_shape))`` is reshaped.

    Raises:
        InvalidInput: Non-numeric, empty, too many inputs, wrong shape, NaN or infinity.
    """
    if x.dtype.kind not in "fiub":
        raise InvalidInput(f"inputs must be numbers, got {x.dtype}", code="invalid_inputs")
    if x.ndim == 0:
        raise InvalidInput(
            "inputs must be a batch (a list of inputs, or an array with the batch first), got one number",
            code="invalid_shape",
            detail={"expected": list(input_shape), "got": []},
        )
    if x.shape[0] == 0:
        raise InvalidInput("empty batch: send at least one input", code="empty_batch")
    if x.shape[0] > max_inputs:
        raise InvalidInput(
            f"{x.shape[0]} inputs in one request; the limit is {max_inputs}",
            code="too_many_inputs",
            detail={"limit": max_inputs},
        )
    expected = tuple(input_shape)
    if tuple(x.shape[1:]) != expected:
        if x.ndim == 2 and x.shape[1] == math.prod(expected):
            x = x.reshape(x.shape[0], *expected)
        else:
            hint = ""
            if math.prod(x.shape) == math.prod(expected):
                hint = (
                    "; this looks like one input without its batch dimension: send a list of inputs ([[...]] in"
                    " JSON) or an array of shape (1, ...)"
                )
            raise InvalidInput(
                f"inputs have shape {list(x.shape[1:])} each; the model expects {list(expected)}"
                f" (or {math.prod(expected)} values flattened){hint}",
                code="invalid_shape",
                detail={"expected": list(expected), "got": list(x.shape[1:])},
            )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.writeable:  # a view of the request body
        x = x.copy()
    finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InvalidInput(
            "inputs hold NaN or infinite values",
            code="non_finite",
            detail={"rows": bad[:20].tolist(), "count": int(bad.size)},
        )
    return x


def resolve_fit(
    services: Services, tenant: str, model_id: str, fit_id: str | None
) -> tuple[ModelRecord, FitRecord | None]:
    """The model and the fit to predict with: the given fit, else the model's newest (``None`` if none)."""
    catalog = services.catalog
    model = catalog.get_model(model_id, tenant)
    if fit_id is not None:
        fit = catalog.get_fit(fit_id, tenant)
        if fit.model_id != model.id:
            raise NotFound(f"fit {fit_id!r} not found for model {model_id!r}", detail={"fit": fit_id})
        return model, fit
    fit = None
    try:
        latest = services.cache.latest(model_id)
    except Exception:  # Redis down: fall back to the store
        latest = None
    if latest:
        fit = catalog.find_fit(latest, tenant)
    if fit is None:
        fit = catalog.latest_fit(model_id)
        if fit is not None and fit.tenant == tenant:
            try:
                services.cache.set_latest(model_id, fit.id)
            except Exception:
                pass
    if fit is not None and fit.tenant != tenant:
        fit = None
    return model, fit


def build_response(
    model: ModelRecord, fit: FitRecord, options: PredictOptions, threshold: float | None, out: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Per-input results as a JSON-able dict (see :class:`~app.api.schemas.PredictResponse`)."""
    n = int(out["ood"].shape[0])
    ood = out["ood"].astype(bool).tolist()
    score = out["ood_score"].astype(np.float64).tolist()
    results: list[dict[str, Any]]
    if model.task == "classification":
        probs = out["probs"]
        top = probs.argmax(axis=1).tolist()
        cols = {name: out[name].astype(np.float64).tolist() for name in CLASSIFICATION_FIELDS if name in out}
        plist = probs.astype(np.float64).tolist()
        names = model.class_names
        results = []
        for i in range(n):
            row: dict[str, Any] = {"probs": plist[i], "predicted_class": top[i]}
            if names:
                row["predicted_label"] = names[top[i]]
            for name, values in cols.items():
                row[name] = values[i]
            row.update(ood_score=score[i], ood=ood[i], ood_threshold=threshold)
            results.append(row)
    else:
        cols = {
            name: out[name].astype(np.float64).tolist()
            for name in (*REGRESSION_FIELDS, *CLASSIFICATION_FIELDS[:3])
            if name in out
        }
        results = [
            {
                **{name: values[i] for name, values in cols.items()},
                "ood_score": score[i],
                "ood": ood[i],
                "ood_threshold": threshold,
            }
            for i in range(n)
        ]
    return {
        "model": model.id,
        "fit": fit.id,
        "task": model.task,
        "predictive": options.predictive,
        "samples": options.samples,
        "ood_score": options.ood_score,
        "ood_threshold": threshold,
        "results": results,
    }


def render_response(
    model: ModelRecord, fit: FitRecord, options: PredictOptions, threshold: float | None, out: dict[str, np.ndarray]
) -> bytes:
    """The JSON bytes of :func:`build_response`."""
    return json.dumps(build_response(model, fit, options, threshold, out), separators=(",", ":")).encode()


@router.post(
    "/{model_id}/predict",
    response_model=None,
    openapi_extra=_REQUEST_DOC,
    responses={
        200: {"model": PredictResponse},
        **error_responses(
            400, 401, 403, 404, 409, 413, 415, 422, 503, s409="No fit yet: POST /v1/models/{id}/fits first"
        ),
    },
)
async def predict(model_id: str, request: Request, services: ServicesDep, tenant: TenantDep) -> Response:
    """Mean class probabilities (or predictive mean and variance), entropy, expected entropy, mutual
    information and an OOD flag with its score and threshold, for each input of the batch."""
    settings = services.settings
    content_type = request.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
    body = await request.body()
    query = dict(request.query_params)
    args = (content_type, body, query, settings.max_predict_inputs, settings.max_json_depth)
    # Large bodies are decoded off the event loop, so small requests keep being served meanwhile.
    x, opts = await run_in_threadpool(parse_body, *args) if len(body) > OFF_LOOP_BYTES else parse_body(*args)
    model, fit = await services.predictors.resolve(
        (tenant, model_id, opts.fit),
        lambda: resolve_fit(services, tenant, model_id, opts.fit),
        keep=lambda found: found[1] is not None,
    )
    check = (x, model.input_shape, settings.max_predict_inputs)
    x = await run_in_threadpool(check_inputs, *check) if x.size > OFF_LOOP_ROWS * 100 else check_inputs(*check)
    if fit is None:
        raise Conflict(f"model {model_id!r} has no fit yet: POST /v1/models/{model_id}/fits first", code="no_fit")
    config = fit.config
    options = PredictOptions(
        samples=opts.samples or int(config.get("samples", 100)),
        predictive=opts.predictive or Predictive(config.get("predictive", Predictive.mc)),
        ood_score=opts.ood_score or fit.ood_score,
        seed=opts.seed,
    )
    if options.samples > settings.max_predict_samples:
        raise InvalidInput(
            f"samples={options.samples} exceeds the limit of {settings.max_predict_samples}",
            code="too_many_samples",
            detail={"limit": settings.max_predict_samples},
        )
    predictor = await services.predictors.get(model, fit)
    out = await predictor.predict(torch.from_numpy(x), options)
    raw_threshold = float(out["ood_threshold"]) if "ood_threshold" in out else math.nan
    threshold = None if math.isnan(raw_threshold) else raw_threshold
    metrics = services.metrics
    metrics.predict_request_inputs.labels(model.id).observe(x.shape[0])
    metrics.predict_mc_samples.labels(model.id, options.predictive).observe(options.samples)
    flagged = int(np.count_nonzero(out["ood"]))
    if flagged:
        metrics.predict_inputs.labels(model.id, "true").inc(flagged)
    if x.shape[0] - flagged:
        metrics.predict_inputs.labels(model.id, "false").inc(x.shape[0] - flagged)
    if x.shape[0] > OFF_LOOP_ROWS:
        content = await run_in_threadpool(render_response, model, fit, options, threshold, out)
    else:
        content = render_response(model, fit, options, threshold, out)
    return Response(content, media_type="application/json")
