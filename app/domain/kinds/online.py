"""The ``online-laplace`` job kind: continual learning over a sequence of uploaded datasets (thesis §5.3-5.4).

Submitted by ``POST /v1/jobs/online-laplace``. Each dataset is a task with its own validation split; the network
(an uploaded model, or the state an earlier job ended with: ``continue_from``) learns them in order with
``curvature.ContinualLearner``: online / EWC / non-online Laplace with Kronecker or diagonal curvature,
Synaptic Intelligence, fine-tuning or joint training. The strength ``λ`` is a number, or ``"validation"``: the
whole sequence is learned for every value of the thesis's grid and the one with the best final mean validation
accuracy is kept (nothing but the tasks' validation splits is looked at).

The run checkpoints the learner after every task (and, while choosing ``λ``, the best finished candidate), so a
redelivered message resumes at the task it was on. Its result: the accuracy matrix ``R[i][j]`` (validation
accuracy on task ``j`` after task ``i``), the final network registered as a model with its Laplace posterior
ready for ``predict`` (the summed precision made servable as ``ContinualLearner.posterior`` documents, OOD
threshold calibrated on the tasks' validation inputs), and ``accuracy.json``, ``accuracy.png`` and the learner's
``state.safetensors`` (what ``continue_from`` reads) as job artifacts.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

import curvature as cv
from app.domain.backend import Backend
from app.domain.catalog import DatasetRecord, ModelRecord, new_id
from app.domain.datasetio import load_canonical
from app.domain.datasets import check_compatible
from app.domain.errors import Conflict, InvalidInput, NotFound
from app.domain.fits import save_fit
from app.domain.jobs import PermanentJobError
from app.domain.kinds.base import Artifacts, JobKind, JobParams, JobResult, JobRun
from app.domain.kinds.fit import load_network
from app.domain.modelio.export import export_onnx
from app.domain.models import ModelMetadata, register_model, require_curvature
from app.domain.plots import png_bytes, subplots
from curvature.options import MAX_SEED, ContinualMethod, ContinualOptimizer, Curvature, Predictive, Task

LAPLACE_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
SI_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
MAX_TASKS = 50
STATE = "state.safetensors"
RUN = "run.json"


class OnlineLaplaceRequest(BaseModel):
    """Body of ``POST /v1/jobs/online-laplace``: tasks in order, the method and how each task is trained.

    Without ``continue_from`` every option not given takes ``curvature.ContinualConfig``'s default; with it,
    ``method``, ``curvature`` and ``strength`` come from the earlier job (giving a different value is an error)
    and the new ``datasets`` are appended to its tasks.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Uploaded classifier to start from (not with continue_from).")
    datasets: list[str] = Field(min_length=1, max_length=MAX_TASKS, description="One dataset per task, in order.")
    continue_from: str | None = Field(default=None, description="A finished online-laplace job to continue.")
    method: ContinualMethod | None = None
    curvature: Curvature | None = None
    strength: float | Literal["validation"] | None = Field(
        default=None, description='λ (c for SI), or "validation" to choose it on the tasks\' validation splits.'
    )
    optimizer: ContinualOptimizer = ContinualOptimizer.adam
    lr: float = Field(default=1e-3, gt=0, le=10, allow_inf_nan=False)
    epochs: int = Field(default=10, ge=1, le=1000, description="Passes over each task's training data.")
    batch_size: int = Field(default=128, ge=1, le=65_536)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    name: str | None = Field(default=None, max_length=200, description="Display name of the resulting model.")

    @model_validator(mode="after")
    def _consistent(self) -> OnlineLaplaceRequest:
        if (self.model is None) == (self.continue_from is None):
            raise ValueError("give exactly one of model and continue_from")
        if isinstance(self.strength, float) and not 0 <= self.strength <= 1e6:
            raise ValueError("strength must lie in [0, 1e6]")
        return self


class OnlineLaplaceParams(JobParams):
    """Everything an online-Laplace job needs; the message body and the job record's ``params``."""

    model_id: str
    dataset_ids: list[str]
    first_new_task: int
    continue_from: str | None = None
    strengths: list[float]
    config: dict[str, Any]
    result_model_id: str
    fit_id: str
    name: str | None = None


def _previous_run(backend: Backend, tenant: str, job_id: str) -> tuple[dict[str, Any], bytes]:
    artifacts = Artifacts(backend)
    try:
        run_json, _ = artifacts.get(job_id, tenant, RUN)
        state, _ = artifacts.get(job_id, tenant, STATE)
    except NotFound as exc:
        raise Conflict(f"job {job_id!r} is not a finished online-laplace job of yours", code="cannot_continue") from exc
    return json.loads(run_json), state


def _task(data_rec: DatasetRecord, backend: Backend, model: ModelRecord) -> tuple[tuple, tuple]:
    data = load_canonical(backend.store.get_blob(data_rec.sha256))

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xt = torch.from_numpy(np.ascontiguousarray(x)).reshape(x.shape[0], *model.input_shape)
        return xt, torch.from_numpy(np.ascontiguousarray(y))

    return tensors(data.x, data.y), tensors(data.x_val, data.y_val)


def accuracy_png(matrix: list[list[float]], title: str) -> bytes:
    """Validation accuracy of each task as later tasks arrive, and their mean (thesis Fig. 5.10 style)."""
    n = len(matrix)
    fig, ax = subplots(figsize=(6.4, 3.6))
    for j in range(n):
        xs = [i + 1 for i in range(j, n) if j < len(matrix[i])]
        ax.plot(
            xs, [matrix[i][j] for i in range(j, n) if j < len(matrix[i])], marker="o", lw=1, ms=3, label=f"task {j + 1}"
        )
    ax.plot(range(1, n + 1), [float(np.mean(row)) for row in matrix], color="black", lw=2.2, label="mean")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, n + 1))
    ax.grid(alpha=0.3)
    if n <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    return png_bytes(fig)


class OnlineLaplaceKind(JobKind[OnlineLaplaceRequest, OnlineLaplaceParams]):
    """Continual learning over a sequence of tasks."""

    name = "online-laplace"
    queue = "online"
    actor = "online_laplace"
    request_model: ClassVar[type[BaseModel]] = OnlineLaplaceRequest
    params_model: ClassVar[type[JobParams]] = OnlineLaplaceParams

    def prepare(
        self, backend: Backend, tenant: str, job_id: str, request: OnlineLaplaceRequest, **context: Any
    ) -> OnlineLaplaceParams:
        earlier_ids: list[str] = []
        inherited: dict[str, Any] = {}
        if request.continue_from is not None:
            run_info, _ = _previous_run(backend, tenant, request.continue_from)
            model = backend.catalog.get_model(run_info["model_id"], tenant)
            earlier_ids = list(run_info["dataset_ids"])
            inherited = dict(run_info["config"])
            for key in ("method", "curvature"):
                given = getattr(request, key)
                if given is not None and given.value != inherited[key]:
                    raise InvalidInput(
                        f"{key} {given.value!r} differs from the continued job's {inherited[key]!r}",
                        code="inconsistent_continuation",
                    )
            if request.strength is not None and request.strength != inherited["strength"]:
                raise InvalidInput(
                    f"strength {request.strength!r} differs from the continued job's {inherited['strength']!r}",
                    code="inconsistent_continuation",
                )
        else:
            model = backend.catalog.get_model(request.model or "", tenant)
        if model.task != Task.classification:
            raise InvalidInput("online-Laplace jobs learn classifiers; the model is a regressor", code="invalid_task")
        if len(earlier_ids) + len(request.datasets) > MAX_TASKS:
            raise InvalidInput(f"at most {MAX_TASKS} tasks in all", code="too_many_tasks")
        for index, dataset_id in enumerate(request.datasets):
            data = backend.catalog.get_dataset(dataset_id, tenant)
            check_compatible(model, data, f"task {len(earlier_ids) + index} dataset")
            if data.n_val < 2:
                raise InvalidInput(
                    f"task dataset {dataset_id!r} needs a validation split (x_val, y_val) of at least 2 rows",
                    code="missing_validation",
                )
        method = ContinualMethod(inherited.get("method") or request.method or cv.ContinualConfig.method)
        curvature = Curvature(inherited.get("curvature") or request.curvature or cv.ContinualConfig.curvature)
        require_curvature(model, curvature)
        strength = inherited.get("strength", request.strength)
        if strength is None:
            strength = cv.ContinualConfig.strength
        if strength == "validation":
            strengths = list(SI_GRID if method == ContinualMethod.si else LAPLACE_GRID)
        else:
            strengths = [float(strength)]
        config = {
            "method": method.value,
            "curvature": curvature.value,
            "strength": strengths[0],
            "optimizer": request.optimizer.value,
            "lr": request.lr,
            "epochs": request.epochs,
            "batch_size": request.batch_size,
            "seed": request.seed,
        }
        try:
            cv.ContinualConfig(**config)
        except ValueError as exc:
            raise InvalidInput(f"invalid continual-learning settings: {exc}", code="invalid_config") from exc
        if request.continue_from is not None and len(strengths) > 1:
            raise InvalidInput("a continued job keeps its strength", code="inconsistent_continuation")
        config["strength_choice"] = "validation" if strength == "validation" else "given"
        return OnlineLaplaceParams(
            job_id=job_id,
            tenant=tenant,
            model_id=model.id,
            dataset_ids=earlier_ids + list(request.datasets),
            first_new_task=len(earlier_ids),
            continue_from=request.continue_from,
            strengths=strengths,
            config=config,
            result_model_id=new_id("mdl"),
            fit_id=new_id("fit"),
            name=request.name,
        )

    def run(self, params: OnlineLaplaceParams, run: JobRun) -> JobResult:
        backend = run.backend
        model_rec = backend.catalog.get_model(params.model_id, params.tenant)
        run.progress(0.0, "loading model and tasks")
        tasks = [_task(backend.catalog.get_dataset(d, params.tenant), backend, model_rec) for d in params.dataset_ids]
        likelihood = cv.CrossEntropy()
        settings = {k: v for k, v in params.config.items() if k != "strength_choice"}
        earlier_state = _previous_run(backend, params.tenant, params.continue_from)[1] if params.continue_from else None

        def fresh_learner(strength: float) -> cv.ContinualLearner:
            module = load_network(backend, model_rec)
            if earlier_state is not None:
                training = {k: v for k, v in settings.items() if k not in ("method", "curvature", "strength")}
                return cv.ContinualLearner.from_bytes(earlier_state, module, likelihood, **training)
            return cv.ContinualLearner(module, likelihood, cv.ContinualConfig(**{**settings, "strength": strength}))

        scores: dict[str, float] = {}
        best: tuple[float, str] | None = None  # (mean final accuracy, sha of the learner's bytes)
        start_candidate, resume_blob, resumed_at = 0, None, None
        saved = run.checkpoints.load(params.job_id)
        if saved is not None:
            blob, meta = saved
            start_candidate, scores = int(meta["candidate"]), dict(meta["scores"])
            best = (float(meta["best"][0]), str(meta["best"][1])) if meta.get("best") else None
            resume_blob = blob if meta.get("partial") else None
            if resume_blob is None:
                start_candidate += 1
            resumed_at = {"candidate": int(meta["candidate"]), "task": int(meta.get("task", -1)) + 1}

        search = {"scores": scores, "best": best}
        for c in range(start_candidate, len(params.strengths)):
            if resume_blob is not None:
                learner = cv.ContinualLearner.from_bytes(resume_blob, load_network(backend, model_rec), likelihood)
                resume_blob = None
            else:
                learner = fresh_learner(params.strengths[c])
            self._learn_candidate(params, run, tasks, learner, c, search)

        best = search["best"]
        scores = search["scores"]
        assert best is not None
        state = backend.store.get_blob(best[1])
        learner = cv.ContinualLearner.from_bytes(state, load_network(backend, model_rec), likelihood)
        return self._finish(params, run, model_rec, learner, state, tasks, scores, resumed_at)

    def _learn_candidate(
        self,
        params: OnlineLaplaceParams,
        run: JobRun,
        tasks: list,
        learner: cv.ContinualLearner,
        c: int,
        search: dict[str, Any],
    ) -> None:
        """Learns the remaining tasks with strength candidate ``c``, checkpointing after each; updates the best."""
        candidates = len(params.strengths)
        strength = params.strengths[c]
        lo, hi = 0.9 * c / candidates, 0.9 * (c + 1) / candidates
        reporter = run.reporter(lo, hi)
        label = f"λ={strength:g} " if candidates > 1 else ""
        new_tasks = len(tasks) - params.first_new_task

        def progress(fraction: float, message: str) -> None:
            reporter(fraction, f"{label}task {learner.n_tasks + 1}/{len(tasks)}: {message}")

        def checkpoint(done: cv.ContinualLearner) -> None:
            best = search["best"]
            meta = {"candidate": c, "task": done.n_tasks - 1, "scores": search["scores"], "partial": True}
            meta["best"] = list(best) if best else None
            run.checkpoints.save(params.job_id, done.to_bytes(), meta, {"best": best[1]} if best else None)
            run.progress(
                lo + (hi - lo) * (done.n_tasks - params.first_new_task) / new_tasks,
                f"{label}task {done.n_tasks}/{len(tasks)} done",
                task=done.n_tasks,
                tasks=len(tasks),
                strength=strength,
                accuracy=done.accuracy[-1],
            )

        cv.run_tasks(learner, tasks, progress=progress, checkpoint=checkpoint)
        score = float(np.mean(learner.accuracy[-1]))
        search["scores"][f"{strength:g}"] = score
        if search["best"] is None or score > search["best"][0]:
            search["best"] = (score, run.backend.store.put_blob(learner.to_bytes()))
        best = search["best"]
        meta = {
            "candidate": c,
            "task": len(tasks) - 1,
            "scores": search["scores"],
            "partial": False,
            "best": list(best),
        }
        run.checkpoints.save(params.job_id, b"", meta, {"best": best[1]})

    def _finish(
        self,
        params: OnlineLaplaceParams,
        run: JobRun,
        model_rec: ModelRecord,
        learner: cv.ContinualLearner,
        state: bytes,
        tasks: list,
        scores: dict[str, float],
        resumed_at: dict[str, int] | None,
    ) -> JobResult:
        backend = run.backend
        started = time.monotonic()
        run.progress(0.92, "registering the final model and its posterior")
        module = learner.model.cpu().float().eval()
        meta = ModelMetadata(
            task=model_rec.task,
            input_shape=model_rec.input_shape,
            class_names=model_rec.class_names,
            name=params.name or f"{model_rec.name or model_rec.id} (online-laplace, {len(tasks)} tasks)",
        )
        trained = register_model(
            backend,
            params.tenant,
            export_onnx(module, torch.zeros(1, *model_rec.input_shape)),
            f"{params.result_model_id}.onnx",
            meta,
            model_id=params.result_model_id,
            parent={"model": model_rec.id, "job": params.job_id},
        )
        posterior = learner.posterior()
        try:  # what the API will do: the stored posterior on the re-imported network
            cv.LaplacePosterior.from_bytes(posterior.to_bytes(), load_network(backend, trained))
        except ValueError as exc:
            raise PermanentJobError("unservable_model", f"the trained network could not be served: {exc}") from exc
        heldout = torch.cat([val[0] for _, val in tasks])
        for predictive in (Predictive.glm, Predictive.mc):
            cv.calibrate_ood(posterior, heldout, quantile=0.95, samples=50, predictive=predictive.value)
        config = {**params.config, "predictive": Predictive.glm.value, "samples": 100, "ood_score": "entropy"}
        fit = save_fit(
            backend,
            posterior,
            id=params.fit_id,
            tenant=params.tenant,
            model_id=trained.id,
            dataset_id=params.dataset_ids[-1],
            job_id=params.job_id,
            config=config,
            ood_score="entropy",
            device="cpu",
            duration_s=time.monotonic() - started,
        )
        matrix = [list(map(float, row)) for row in learner.accuracy]
        accuracy = json.dumps({"accuracy": matrix, "datasets": params.dataset_ids, "strength_scores": scores})
        links = {
            "model": f"/v1/models/{trained.id}",
            "fit": f"/v1/fits/{fit.id}",
            "accuracy": run.publish("accuracy.json", accuracy.encode()),
            "accuracy_png": run.publish("accuracy.png", accuracy_png(matrix, f"{params.config['method']} Laplace")),
            "state": run.publish(STATE, state),
        }
        run_info = {"model_id": params.model_id, "dataset_ids": params.dataset_ids, "config": learner.config.to_json()}
        run.publish(RUN, json.dumps(run_info).encode())
        run.checkpoints.clear(params.job_id)
        result = {
            "accuracy": matrix,
            "final_mean_accuracy": float(np.mean(matrix[-1])),
            "strength": learner.config.strength,
            "strength_scores": scores,
            "model": trained.id,
            "fit": fit.id,
            "resumed_at": resumed_at,
            "links": links,
        }
        return JobResult(result, f"{len(tasks)} tasks learned: mean accuracy {result['final_mean_accuracy']:.3f}")


ONLINE_LAPLACE = OnlineLaplaceKind()
