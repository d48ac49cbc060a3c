"""The ``optimise`` job kind: train an uploaded network with the second-order optimiser (or a baseline).

Submitted by ``POST /v1/jobs/optimise``. The uploaded model's weights are the initialisation; the method is
the Kronecker-factored / diagonal Gauss-Newton optimiser of ``curvature.optim`` with one curvature (thesis
§4.4), or Adam / SGD as first-order baselines. Checks before queueing: the model and dataset exist for the
tenant; the rows fit the model; the targets fit the likelihood (labels within the outputs for
``classification``, float targets of the output width for ``regression``, 0/1 targets or an unlabelled
dataset whose inputs in [0, 1] have the output's size for ``binary`` — an autoencoder, whose target is its
input — and 0/1 labels with three outputs for ``binary_mixture``); the curvature can be fitted on the network.

The run visits batches in a seeded order that depends only on the step index, checkpoints the weights, the
optimiser's state and the curve every ``checkpoint_every`` steps, and resumes from the last checkpoint when the
message is redelivered. Its result is a new model in the catalog (lineage: parent model and job), ready to be
fitted and served, and the training curve as ``curve.json`` and ``curve.png``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

import curvature as cv
from app.domain.backend import Backend
from app.domain.catalog import DatasetRecord, ModelRecord, new_id
from app.domain.datasetio import load_canonical
from app.domain.datasets import check_rows
from app.domain.errors import InvalidInput
from app.domain.jobs import PermanentJobError
from app.domain.kinds.base import JobKind, JobParams, JobResult, JobRun
from app.domain.kinds.fit import load_network
from app.domain.metrics import get_metrics
from app.domain.modelio.export import export_onnx
from app.domain.models import ModelMetadata, register_model, require_curvature
from app.domain.plots import png_bytes, subplots
from app.domain.statepack import pack_state, unpack_state
from curvature.options import (
    FIRST_ORDER_METHODS,
    MAX_SEED,
    Curvature,
    Damping,
    LikelihoodName,
    Task,
    TrainingMethod,
)

DEFAULT_LR = {TrainingMethod.adam: 1e-3, TrainingMethod.sgd: 1e-2}
DEFAULT_STEPS = 100
_PROGRESS_INTERVAL_S = 0.25


class OptimiseRequest(BaseModel):
    """Body of ``POST /v1/jobs/optimise``.

    ``method`` is a curvature of the second-order optimiser (defaults of ``curvature.OptimizerConfig``, no tuning
    needed) or ``adam`` / ``sgd`` with ``lr``. Give ``steps`` or ``epochs`` (default: 100 steps).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Id of the uploaded model whose weights are the initialisation.")
    dataset: str = Field(description="Training dataset id (an unlabelled one trains a binary autoencoder).")
    likelihood: LikelihoodName | None = Field(
        default=None, description="Default: classification or regression from the model's task."
    )
    method: TrainingMethod = TrainingMethod.kfra
    damping: Damping = Field(default=Damping.factored, description="Second-order methods only.")
    momentum: bool = Field(default=False, description="Second-order methods: solve for (α, μ) each step.")
    weight_decay: float = Field(default=0.0, ge=0, le=1e3, allow_inf_nan=False)
    lr: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False, description="adam / sgd only.")
    steps: int | None = Field(default=None, ge=1, le=100_000)
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    batch_size: int = Field(default=500, ge=1, le=65_536)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    checkpoint_every: int = Field(default=20, ge=1, le=100_000, description="Steps between checkpoints.")
    name: str | None = Field(default=None, max_length=200, description="Display name of the trained model.")

    @model_validator(mode="after")
    def _consistent(self) -> OptimiseRequest:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.lr is not None and self.method not in FIRST_ORDER_METHODS:
            raise ValueError("lr applies to adam and sgd; the second-order step size comes from its quadratic model")
        return self


class OptimiseParams(JobParams):
    """Everything an optimise job needs; the message body and the job record's ``params``."""

    model_id: str
    dataset_id: str
    result_model_id: str
    likelihood: LikelihoodName
    method: TrainingMethod
    autoencoder: bool
    optimizer: dict[str, Any] = Field(default_factory=dict, description="curvature.OptimizerConfig fields.")
    lr: float | None = None
    steps: int
    batch_size: int
    seed: int
    checkpoint_every: int
    name: str | None = None


def _default_likelihood(model: ModelRecord) -> LikelihoodName:
    return LikelihoodName.classification if model.task == Task.classification else LikelihoodName.regression


def check_targets(model: ModelRecord, data: DatasetRecord, likelihood: LikelihoodName) -> bool:
    """Checks that the dataset's targets fit ``likelihood`` and the model's outputs.

    Returns:
        Whether the target is the input (an autoencoder: unlabelled data with a ``binary`` likelihood).

    Raises:
        InvalidInput: With code ``incompatible_targets``.
    """

    def refuse(why: str) -> InvalidInput:
        return InvalidInput(
            f"dataset {data.id!r} does not fit likelihood {likelihood.value!r} on model {model.id!r}: {why}",
            code="incompatible_targets",
            detail={"likelihood": likelihood.value, "y_kind": data.y_kind, "output_dim": model.output_dim},
        )

    width = data.y_shape[0] if data.y_shape else 1
    if likelihood == LikelihoodName.binary and data.y_kind == "none":
        if math.prod(data.x_shape) != model.output_dim:
            raise refuse(f"an autoencoder needs {math.prod(data.x_shape)} outputs (the input size)")
        if data.x_range is not None and (data.x_range[0] < 0 or data.x_range[1] > 1):
            raise refuse(f"Bernoulli targets must lie in [0, 1]; the inputs span {data.x_range}")
        return True
    if data.y_kind == "none":
        raise refuse("it has no targets y (only a binary autoencoder trains on unlabelled data)")
    if likelihood == LikelihoodName.classification:
        if data.y_kind != "int" or model.output_dim < 2:
            raise refuse("softmax classification needs integer labels and at least 2 outputs")
        if (data.num_classes or 0) > model.output_dim:
            raise refuse(f"labels reach {data.num_classes - 1}")
    elif likelihood == LikelihoodName.regression:
        if data.y_kind != "float" or width != model.output_dim:
            raise refuse(f"needs float targets of width {model.output_dim}")
    elif likelihood == LikelihoodName.binary:
        if width != model.output_dim or data.y_range is None or data.y_range[0] < 0 or data.y_range[1] > 1:
            raise refuse(f"needs targets in [0, 1] of width {model.output_dim}")
    elif likelihood == LikelihoodName.binary_mixture:
        if model.output_dim != 3 or data.y_kind != "int" or (data.num_classes or 0) > 2 or data.y_shape:
            raise refuse("the mixture classifier needs 3 outputs and 0/1 labels")
    return False


def _targets(y: np.ndarray | None, x: torch.Tensor, likelihood: LikelihoodName, autoencoder: bool) -> torch.Tensor:
    if autoencoder:
        return x.reshape(x.shape[0], -1).clone()
    assert y is not None
    t = torch.from_numpy(np.ascontiguousarray(y))
    if likelihood in (LikelihoodName.regression, LikelihoodName.binary):
        t = t.to(torch.float32)
        return t.reshape(-1, 1) if t.ndim == 1 else t
    if likelihood == LikelihoodName.binary_mixture:
        return t.to(torch.float32)
    return t


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Rows of step ``step``: epoch ``e`` visits a permutation seeded by ``(seed, e)``, so any step's batch is
    known without replaying the earlier ones (a resumed run sees the same batches)."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed((seed + 7919 * epoch) % (2**63)))
    return order[index * batch_size : (index + 1) * batch_size]


def _string_keys(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "state": {str(k): v for k, v in state["state"].items()}}


def _int_keys(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "state": {int(k): v for k, v in state["state"].items()}}


def curve_png(curve: list[dict[str, Any]], title: str) -> bytes:
    """Loss against steps and against seconds (thesis Fig. 4.1 style), as PNG bytes."""
    steps = [c["step"] for c in curve]
    loss = [c["loss"] for c in curve]
    seconds = [c["seconds"] for c in curve]
    fig, (left, right) = subplots(1, 2, figsize=(9, 3.4))
    for ax, xs, label in ((left, steps, "step"), (right, seconds, "seconds")):
        ax.plot(xs, loss, lw=1.2)
        ax.set_xlabel(label)
        ax.set_ylabel("training loss (batch)")
        if min(loss) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return png_bytes(fig)


class OptimiseKind(JobKind[OptimiseRequest, OptimiseParams]):
    """Second-order (or baseline) training of an uploaded network."""

    name = "optimise"
    queue = "optimise"
    actor = "optimise"
    request_model: ClassVar[type[BaseModel]] = OptimiseRequest
    params_model: ClassVar[type[JobParams]] = OptimiseParams

    def prepare(
        self, backend: Backend, tenant: str, job_id: str, request: OptimiseRequest, **context: Any
    ) -> OptimiseParams:
        model = backend.catalog.get_model(request.model, tenant)
        data = backend.catalog.get_dataset(request.dataset, tenant)
        check_rows(model, data)
        likelihood = request.likelihood or _default_likelihood(model)
        autoencoder = check_targets(model, data, likelihood)
        optimizer: dict[str, Any] = {}
        if request.method not in FIRST_ORDER_METHODS:
            curvature = Curvature(request.method.value)
            require_curvature(model, curvature)
            optimizer = {
                "curvature": curvature.value,
                "damping": request.damping.value,
                "momentum": request.momentum,
                "weight_decay": request.weight_decay,
                "seed": request.seed,
            }
            try:
                cv.OptimizerConfig(**optimizer)
            except ValueError as exc:
                raise InvalidInput(f"invalid optimiser settings: {exc}", code="invalid_config") from exc
        per_epoch = max(1, math.ceil(data.n / request.batch_size))
        steps = request.steps or (request.epochs * per_epoch if request.epochs else DEFAULT_STEPS)
        if steps > 100_000:
            raise InvalidInput(f"{steps} steps exceed the limit of 100000", code="too_many_steps")
        return OptimiseParams(
            job_id=job_id,
            tenant=tenant,
            model_id=model.id,
            dataset_id=data.id,
            result_model_id=new_id("mdl"),
            likelihood=likelihood,
            method=request.method,
            autoencoder=autoencoder,
            optimizer=optimizer,
            lr=request.lr or DEFAULT_LR.get(request.method),
            steps=steps,
            batch_size=request.batch_size,
            seed=request.seed,
            checkpoint_every=request.checkpoint_every,
            name=request.name,
        )

    def run(self, params: OptimiseParams, run: JobRun) -> JobResult:
        backend = run.backend
        metrics = get_metrics()
        model_rec = backend.catalog.get_model(params.model_id, params.tenant)
        data_rec = backend.catalog.get_dataset(params.dataset_id, params.tenant)
        run.progress(0.0, "loading model and data")
        module = load_network(backend, model_rec)
        data = load_canonical(backend.store.get_blob(data_rec.sha256))
        device = run.device()
        module = module.to(device).train()
        x = torch.from_numpy(np.ascontiguousarray(data.x)).reshape(data.x.shape[0], *model_rec.input_shape)
        y = _targets(data.y, x, params.likelihood, params.autoencoder)
        x, y = x.to(device), y.to(device)
        likelihood = cv.likelihood_from_name(params.likelihood)

        second_order = params.method not in FIRST_ORDER_METHODS
        if second_order:
            optimiser: Any = cv.SecondOrderOptimizer(module, likelihood, cv.OptimizerConfig(**params.optimizer))
        elif params.method == TrainingMethod.adam:
            optimiser = torch.optim.Adam(module.parameters(), lr=params.lr)
        else:
            optimiser = torch.optim.SGD(module.parameters(), lr=params.lr)

        start_step, curve, elapsed = 0, [], 0.0
        saved = run.checkpoints.load(params.job_id)
        if saved is not None:
            state = unpack_state(saved[0])
            module.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"] if second_order else _int_keys(state["optimiser"]))
            start_step, curve, elapsed = int(state["step"]), list(state["curve"]), float(state["seconds"])
        resumed_from = start_step if saved is not None else None

        def checkpoint(step: int, seconds: float) -> None:
            opt_state = optimiser.state_dict()
            state = {
                "step": step,
                "seconds": seconds,
                "curve": curve,
                "model": module.state_dict(),
                "optimiser": opt_state if second_order else _string_keys(opt_state),
            }
            run.checkpoints.save(params.job_id, pack_state(state), {"step": step})

        label = params.method.value
        begun = time.monotonic()
        last_report = 0.0
        for step in range(start_step, params.steps):
            rows = batch_indices(len(x), params.batch_size, params.seed, step)
            xb, yb = x[rows], y[rows]
            if second_order:
                info = optimiser.step(xb, yb)
                loss = float(info.loss)
                diag = {k: info.as_dict()[k] for k in ("alpha", "mu", "tau", "zeta", "rho")}
            else:
                optimiser.zero_grad()
                objective = likelihood.nll(module(xb), yb) / len(rows)
                objective.backward()
                optimiser.step()
                loss, diag = float(objective.detach()), {}
            if not math.isfinite(loss) and not second_order:
                raise PermanentJobError("diverged", f"{label} diverged at step {step} (loss {loss}); lower lr")
            seconds = elapsed + time.monotonic() - begun
            curve.append({"step": step + 1, "seconds": round(seconds, 4), "loss": loss, **diag})
            metrics.train_steps.labels(self.name, label).inc()
            now = time.monotonic()
            if now - last_report >= _PROGRESS_INTERVAL_S or step + 1 == params.steps:
                last_report = now
                rate = (step + 1 - start_step) / max(now - begun, 1e-9)
                metrics.train_step_rate.labels(self.name, label).set(rate)
                run.progress(
                    0.95 * (step + 1) / params.steps,
                    f"step {step + 1}/{params.steps} loss {loss:.5g}",
                    step=step + 1,
                    steps=params.steps,
                    loss=loss,
                    steps_per_second=round(rate, 3),
                    **{k: v for k, v in diag.items() if math.isfinite(v)},
                )
            if (step + 1) % params.checkpoint_every == 0 and step + 1 < params.steps:
                checkpoint(step + 1, seconds)

        module.eval()
        with torch.no_grad():
            final = sum(
                float(likelihood.nll(module(x[i : i + 2048]), y[i : i + 2048])) for i in range(0, len(x), 2048)
            ) / len(x)
        if not math.isfinite(final):
            raise PermanentJobError("diverged", f"training with {label} ended at a non-finite loss")
        run.progress(0.96, "registering the trained model")
        example = torch.zeros(1, *model_rec.input_shape)
        onnx_bytes = export_onnx(module.cpu().float(), example)
        meta = ModelMetadata(
            task=model_rec.task,
            input_shape=model_rec.input_shape,
            class_names=model_rec.class_names,
            name=params.name or f"{model_rec.name or model_rec.id} ({label}, {params.steps} steps)",
        )
        trained = register_model(
            backend,
            params.tenant,
            onnx_bytes,
            f"{params.result_model_id}.onnx",
            meta,
            model_id=params.result_model_id,
            parent={"model": model_rec.id, "job": params.job_id},
        )
        title = f"{label} on {data_rec.name or data_rec.id}"
        curve_url = run.publish("curve.json", json.dumps({"method": label, "curve": curve}).encode())
        png_url = run.publish("curve.png", curve_png(curve, title))
        run.checkpoints.clear(params.job_id)
        result = {
            "model": trained.id,
            "final_loss": final,
            "steps": params.steps,
            "seconds": curve[-1]["seconds"] if curve else 0.0,
            "resumed_from_step": resumed_from,
            "links": {"model": f"/v1/models/{trained.id}", "curve": curve_url, "curve_png": png_url},
        }
        return JobResult(result, f"trained: loss {final:.5g} after {params.steps} steps")


OPTIMISE = OptimiseKind()
