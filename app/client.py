"""A Python client of the kronlap HTTP API, on the standard library only (no server dependency).

::

    from app.client import Client

    kl = Client("http://127.0.0.1:8000", api_key="...")
    model = kl.upload_model("mlp.onnx", task="classification", class_names=["0", "1", ...])
    data = kl.upload_dataset("train.npz")
    submitted = kl.fit(model["id"], data["id"], curvature="kflr")
    job = kl.wait(submitted["job"]["id"], on_update=print)
    answer = kl.predict_file(model["id"], "x.npy", samples=100)

Every method returns the decoded JSON answer; an error answer raises :class:`ApiError` carrying the
service's error envelope (``status``, ``code``, ``message``, ``detail``). Job kinds share :meth:`Client.submit`
and :meth:`Client.wait`: a new kind is one method posting its body to its route (see :meth:`Client.fit`).
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
NPY_TYPE = "application/x-npy"


class ApiError(Exception):
    """An error answer of the service (or no answer at all: ``status`` 0, code ``unreachable``)."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after = retry_after


def npz_member(path: str | os.PathLike[str], key: str | None = None) -> bytes:
    """The raw ``.npy`` bytes of one array of an ``.npz`` file (``key``, else ``x``, else the only one).

    Raises:
        ValueError: No such array, or several and none named ``x``.
    """
    with zipfile.ZipFile(path) as archive:
        names = {Path(n).stem: n for n in archive.namelist() if n.endswith(".npy")}
        if key is None:
            key = "x" if "x" in names else (next(iter(names)) if len(names) == 1 else None)
        if key is None or key not in names:
            raise ValueError(f"{os.fspath(path)} holds {sorted(names)}; name the array to send (e.g. key='x')")
        return archive.read(names[key])


class Client:
    """Talks to one kronlap service.

    Args:
        url: Base URL of the service.
        api_key: API key (sent as ``Authorization: Bearer``); ``None`` for an open (embedded) service.
        timeout_s: Socket timeout of each request.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 300.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    # -- transport ---------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        raw_body: bool = False,
    ) -> Any:
        """Sends one request; returns the decoded JSON answer (``None`` for an empty one), or with ``raw_body``
        the answer's bytes.

        Raises:
            ApiError: An error status, or the service is unreachable.
        """
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        sent = {"Accept": "application/json", **(headers or {})}
        if self.api_key and "Authorization" not in sent:
            sent["Authorization"] = f"Bearer {self.api_key}"
        if content_type is not None:
            sent["Content-Type"] = content_type
        req = urllib.request.Request(url, data=body, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                data = response.read()
                ctype = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except urllib.error.URLError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {self.url}: {exc.reason}") from None
        if raw_body:
            return data
        if not data:
            return None
        return json.loads(data) if ctype.startswith("application/json") else data.decode(errors="replace")

    def get(self, path: str, **params: Any) -> Any:
        """``GET path`` with query parameters."""
        return self.request("GET", path, params=params)

    def post_json(self, path: str, payload: Any, **params: Any) -> Any:
        """``POST path`` with a JSON body."""
        return self.request(
            "POST", path, body=json.dumps(payload).encode(), content_type="application/json", params=params
        )

    def delete(self, path: str) -> Any:
        """``DELETE path``."""
        return self.request("DELETE", path)

    def post_file(self, path: str, file: str | os.PathLike[str] | bytes, filename: str, **fields: Any) -> Any:
        """``POST path`` as ``multipart/form-data`` with ``file`` and text ``fields`` (``None`` ones skipped)."""
        data = file if isinstance(file, bytes) else Path(file).read_bytes()
        boundary = f"kronlap-{uuid.uuid4().hex}"
        out = io.BytesIO()
        for name, value in fields.items():
            if value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value)
            out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{text}\r\n'.encode())
        safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data)
        out.write(f"\r\n--{boundary}--\r\n".encode())
        return self.request("POST", path, body=out.getvalue(), content_type=f"multipart/form-data; boundary={boundary}")

    # -- models and datasets -----------------------------------------------------------------------------

    def upload_model(
        self,
        file: str | os.PathLike[str] | bytes,
        *,
        task: str | None = None,
        input_shape: Iterable[int] | None = None,
        class_names: Iterable[str] | None = None,
        name: str | None = None,
        filename: str | None = None,
    ) -> dict[str, Any]:
        """Uploads an ONNX (``.onnx``) or ``torch.export`` (``.pt2``) network; returns the model."""
        return self.post_file(
            "/v1/models",
            file,
            filename or (Path(file).name if not isinstance(file, bytes) else "model"),
            task=task,
            input_shape=list(input_shape) if input_shape is not None else None,
            class_names=list(class_names) if class_names is not None else None,
            name=name,
        )

    def models(self) -> list[dict[str, Any]]:
        """The caller's models, newest first."""
        return self.get("/v1/models")

    def model(self, model_id: str) -> dict[str, Any]:
        """One model."""
        return self.get(f"/v1/models/{_seg(model_id)}")

    def delete_model(self, model_id: str) -> None:
        """Deletes a model and its fits."""
        self.delete(f"/v1/models/{_seg(model_id)}")

    def upload_dataset(
        self, file: str | os.PathLike[str] | bytes, *, name: str | None = None, filename: str | None = None
    ) -> dict[str, Any]:
        """Uploads an ``.npz`` with ``x``, ``y`` (and optionally ``x_val``, ``y_val``); returns the dataset."""
        return self.post_file(
            "/v1/datasets",
            file,
            filename or (Path(file).name if not isinstance(file, bytes) else "data.npz"),
            name=name,
        )

    def datasets(self) -> list[dict[str, Any]]:
        """The caller's datasets, newest first."""
        return self.get("/v1/datasets")

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        """One dataset."""
        return self.get(f"/v1/datasets/{_seg(dataset_id)}")

    def delete_dataset(self, dataset_id: str) -> None:
        """Deletes a dataset (fits made from it stay usable)."""
        self.delete(f"/v1/datasets/{_seg(dataset_id)}")

    # -- jobs --------------------------------------------------------------------------------------------

    def submit(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Posts a job request to its route; returns the answer (it names the job)."""
        return self.post_json(path, dict(body))

    def fit(self, model_id: str, dataset: str, **options: Any) -> dict[str, Any]:
        """Queues a Laplace fit (options as in ``POST /v1/models/{id}/fits``); returns ``fit_id`` and ``job``."""
        body = {"dataset": dataset, **{k: v for k, v in options.items() if v is not None}}
        return self.submit(f"/v1/models/{_seg(model_id)}/fits", body)

    def optimise(self, model_id: str, dataset: str, **options: Any) -> dict[str, Any]:
        """Queues an optimiser run (options as in ``POST /v1/jobs/optimise``: method, steps, lr, ...)."""
        body = {"model": model_id, "dataset": dataset, **{k: v for k, v in options.items() if v is not None}}
        return self.submit("/v1/jobs/optimise", body)

    def online_laplace(self, datasets: list[str], **options: Any) -> dict[str, Any]:
        """Queues continual learning over ``datasets`` in order (``model=`` or ``continue_from=`` and the options
        of ``POST /v1/jobs/online-laplace``)."""
        body = {"datasets": list(datasets), **{k: v for k, v in options.items() if v is not None}}
        return self.submit("/v1/jobs/online-laplace", body)

    def artifacts(self, job_id: str) -> list[str]:
        """Names of the files a job published."""
        return self.get(f"/v1/jobs/{_seg(job_id)}/artifacts")

    def artifact(self, job_id: str, name: str) -> bytes:
        """One published file of a job (``curve.json``, ``curve.png``, ``accuracy.json`` ...), as bytes."""
        return self.request("GET", f"/v1/jobs/{_seg(job_id)}/artifacts/{_seg(name)}", raw_body=True)

    def fits(self, model_id: str) -> list[dict[str, Any]]:
        """Ready fits of a model, newest first."""
        return self.get(f"/v1/models/{_seg(model_id)}/fits")

    def get_fit(self, fit_id: str) -> dict[str, Any]:
        """A fit, ready or in progress."""
        return self.get(f"/v1/fits/{_seg(fit_id)}")

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's state."""
        return self.get(f"/v1/jobs/{_seg(job_id)}")

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The caller's recent jobs, newest first."""
        return self.get("/v1/jobs", limit=limit)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancels a queued or running job."""
        return self.delete(f"/v1/jobs/{_seg(job_id)}")

    def wait(
        self,
        job_id: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        interval_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Polls a job until it is final; ``on_update`` sees every state read. Returns the final state.

        Raises:
            TimeoutError: Not final after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in FINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(interval_s)

    # -- predict -----------------------------------------------------------------------------------------

    def predict(
        self,
        model_id: str,
        inputs: list[Any] | bytes,
        *,
        samples: int | None = None,
        predictive: str | None = None,
        ood_score: str | None = None,
        fit: str | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Predicts for a batch: a list of inputs (sent as JSON) or the bytes of one ``.npy`` array."""
        options = {"samples": samples, "predictive": predictive, "ood_score": ood_score, "fit": fit, "seed": seed}
        path = f"/v1/models/{_seg(model_id)}/predict"
        if isinstance(inputs, bytes):
            return self.request("POST", path, body=inputs, content_type=NPY_TYPE, params=options)
        return self.post_json(path, {"inputs": inputs, **{k: v for k, v in options.items() if v is not None}})

    def predict_file(
        self, model_id: str, path: str | os.PathLike[str], key: str | None = None, **options: Any
    ) -> dict[str, Any]:
        """Predicts for the batch in an ``.npy`` file or one array (``key``, default ``x``) of an ``.npz``."""
        data = npz_member(path, key) if zipfile.is_zipfile(path) else Path(path).read_bytes()
        return self.predict(model_id, data, **options)

    # -- operations --------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``/healthz`` (no key needed)."""
        return self.get("/healthz")

    def ready(self) -> dict[str, Any]:
        """``/readyz`` (no key needed); raises :class:`ApiError` 503 when not ready."""
        return self.get("/readyz")

    def metrics(self, token: str | None = None) -> str:
        """The Prometheus text of ``/metrics`` (``token``: the scrape token when API keys are configured)."""
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return self.request("GET", "/metrics", headers=headers)


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    raw = exc.read()
    retry = exc.headers.get("Retry-After") if exc.headers else None
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    try:
        error = json.loads(raw)["error"]
        return ApiError(exc.code, error["code"], error["message"], error.get("detail"), retry_after)
    except (ValueError, KeyError, TypeError):
        return ApiError(
            exc.code, "http_error", raw.decode(errors="replace")[:500] or str(exc.reason), None, retry_after
        )
