"""ONNX import: validate an uploaded model and rebuild it from real ``nn`` layers.

Supported operators (default domain only):

- layers: ``Gemm`` (any ``alpha``/``beta``/``transB``; ``transA=0``), ``MatMul`` with a constant weight
  (a following constant ``Add`` becomes its bias), ``Conv`` (2-D; pads, strides, dilations, ``auto_pad``;
  asymmetric pads become an ``nn.ZeroPad2d`` in front; ``group`` > 1 is refused with ``unsupported_layer``
  because the curvature core cannot fit grouped convolutions);
- activations: ``Relu``, ``LeakyRelu``, ``Tanh``, ``Sigmoid``, ``Elu``, ``Softplus`` (also the
  ``Softplus``/``Greater``/``Where`` threshold pattern ``torch.onnx.export(dynamo=True)`` emits), ``Gelu``,
  ``Clip`` with constant bounds (ReLU6 and hard-tanh), ``Selu`` (torch's constants), ``Mish``, ``HardSwish``,
  ``HardSigmoid``, ``PRelu`` with constant slopes, and ``Mul(x, Sigmoid(x))`` as ``nn.SiLU`` (how both torch
  exporters write SiLU);
- shape: ``Flatten``, ``Reshape`` (constant or ``Shape``-derived target, ``allowzero`` 0 or 1, ``-1`` and
  ``0`` entries), ``Squeeze``, ``Unsqueeze``, and the shape arithmetic exporters emit for dynamic batch
  sizes (``Shape``, ``Gather``, ``Concat``, ``Slice``, ``Cast``, ``Constant``);
- pooling: ``MaxPool``, ``AveragePool``, ``GlobalAveragePool``, ``GlobalMaxPool``, ``ReduceMean`` over
  non-batch axes;
- other: ``BatchNormalization`` (inference; folded into the preceding ``Conv``/``Gemm``/``MatMul`` when that
  layer's output has no other use, else a parameter-free per-channel affine), ``Add``/``Sub``/``Mul``/``Div``
  with a constant (folded the same way) and ``Add`` of two activations (residual connection),
  ``Concat`` of activations along an axis within each example, ``InstanceNormalization`` (also the
  ``Reshape``/``InstanceNormalization``/``Reshape`` form exporters give GroupNorm), ``LayerNormalization`` over
  axes within each example (constant scale and bias, kept at their trained
  values), ``Identity``, ``Dropout`` (inference), ``Constant`` and initializers, ``Transpose`` of constants;
- a final ``Softmax``/``LogSoftmax``/``Sigmoid`` is stripped and reported.

Operator semantics shared with the ``.pt2`` importer live in :mod:`app.domain.modelio.ops`. Everything else
raises ``ModelImportError("unsupported_op")`` naming the operators. Tensors stored as external data are read
from the zip archive the model was uploaded in (:mod:`app.domain.modelio.onnx_archive`), never from a path; a
model uploaded alone that refers to external data is refused naming the files it needs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from .errors import ModelImportError
from .modules import Mean
from .onnx_archive import OnnxArchive, inline_external_data, is_zip, read_onnx_archive
from .ops import (
    SELU_ALPHA,
    SELU_SCALE,
    OpRefused,
    activation_module,
    add_arithmetic,
    add_batch_norm,
    add_concat,
    add_conv2d,
    check_class_axis,
    clamp_module,
    example_dims,
    group_norm_module,
    layer_norm_module,
    linear_layer,
    prelu_module,
    same_pads,
)
from .program import (
    MAX_ACTIVATION_ELEMENTS,
    ProgramBuilder,
    Translation,
    finish_translation,
    resolve_input_shape,
    resolve_reshape,
    split_batch_dim,
)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FINAL_ACTIVATIONS = {"Softmax": "softmax", "LogSoftmax": "log_softmax", "Sigmoid": "sigmoid"}
_FLOAT_INPUTS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64}

#: ONNX activation operators: the shared activation kind and its parameters from the node's attributes.
_ACTIVATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "Relu": ("relu", lambda a: {}),
    "LeakyRelu": ("leaky_relu", lambda a: {"negative_slope": a.get("alpha", 0.01)}),
    "Tanh": ("tanh", lambda a: {}),
    "Sigmoid": ("sigmoid", lambda a: {}),
    "Elu": ("elu", lambda a: {"alpha": a.get("alpha", 1.0)}),
    # ONNX Softplus has no threshold; torch's switches to the identity above it.
    "Softplus": ("softplus", lambda a: {"beta": 1.0, "threshold": math.inf}),
    "Gelu": ("gelu", lambda a: {"approximate": a.get("approximate", "none")}),
    "Selu": ("selu", lambda a: {"alpha": a.get("alpha", SELU_ALPHA), "gamma": a.get("gamma", SELU_SCALE)}),
    "Mish": ("mish", lambda a: {}),
    "HardSwish": ("hardswish", lambda a: {}),
    "HardSigmoid": ("hardsigmoid", lambda a: {"alpha": a.get("alpha", 0.2), "beta": a.get("beta", 0.5)}),
}
_ARITHMETIC = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}

SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        *_ACTIVATIONS, *_ARITHMETIC, *_FINAL_ACTIVATIONS, "Gemm", "MatMul", "Conv", "Clip", "Flatten",
        "Reshape", "Squeeze", "Unsqueeze", "Shape", "Gather", "Concat", "Slice", "Cast", "Constant",
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "BatchNormalization",
        "Identity", "Dropout", "Transpose", "Greater", "Where", "PRelu", "LayerNormalization",
        "InstanceNormalization",
    }
)  # fmt: skip


@dataclass(frozen=True)
class _Sym:
    """An integer shape value computed from activation shapes; ``None`` entries are the batch size."""

    values: tuple[int | None, ...]
    scalar: bool = False


@dataclass(frozen=True)
class _Threshold:
    """``x > threshold`` on an activation, kept until a ``Where`` consumes it."""

    source: str
    threshold: float


def _inference_batch_norm() -> type:
    """An ``onnx.reference`` BatchNormalization that always uses the stored statistics."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=1e-5, **_):
            view = (-1,) + (1,) * (x.ndim - 2)
            y = (x - mean.reshape(view)) / np.sqrt(var.reshape(view) + epsilon) * scale.reshape(view)
            return ((y + bias.reshape(view)).astype(x.dtype),)

    return BatchNormalization


def _float_tensor(value: Any) -> Tensor:
    """A float32 tensor holding a copy of ``value`` (initializer arrays may be read-only)."""
    return torch.tensor(np.asarray(value, dtype=np.float32))


def _fail_op(node: onnx.NodeProto, reason: str, code: str = "unsupported_op", **detail: Any) -> ModelImportError:
    return ModelImportError(
        code,
        f"ONNX {node.op_type} node {node.name!r}: {reason}",
        {"op": node.op_type, "node": node.name, "reason": reason, **detail},
    )


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise _fail_op(node, "sub-graph attributes are not supported")
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        out[attr.name] = value
    return out


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto stored in ``graph`` and its sub-graphs (initializers and attributes)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]):
    """Every TensorProto stored in the attributes of ``nodes`` and of their sub-graphs (the stored objects)."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def parse_onnx(data: bytes, archive: OnnxArchive | None = None, *, max_bytes: int) -> onnx.ModelProto:
    """Decode and validate an ONNX model, copying its external data in from the uploaded archive.

    Args:
        data: The serialised ``ModelProto``.
        archive: The zip archive the model came in, whose members hold its external data; ``None`` for a
            model uploaded alone.
        max_bytes: Upper bound on the external data copied into the model.

    Returns:
        The checked model, every tensor embedded.

    Raises:
        ModelImportError: ``invalid_onnx`` when decoding or ``onnx.checker`` fails, or a tensor refers to
            external data that was not uploaded (refused naming the files; no path is ever opened);
            ``unsafe_archive`` for an external-data location that is not a plain relative path.
    """
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises several unrelated types on corrupt input
        raise ModelImportError("invalid_onnx", f"not a decodable ONNX model: {exc}") from None
    tensors = [*_tensors(model.graph), *(t for function in model.functions for t in _node_tensors(function.node))]
    inline_external_data(tensors, archive, max_bytes=max_bytes)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelImportError("invalid_onnx", f"ONNX model fails validation: {exc}") from None
    return model


def translate_onnx(data: bytes, input_shape: Sequence[int] | None, *, max_bytes: int) -> Translation:
    """Rebuild an ONNX model, uploaded alone or as a zip archive with its external data, as a torch module.

    Args:
        data: The serialised ONNX model, or a zip archive holding it and its external-data files.
        input_shape: Per-example input shape; required when the graph's non-batch input dims are dynamic.
        max_bytes: Upper bound on an archive's uncompressed size and on the external data.

    Returns:
        The rebuilt module with an ``onnx.reference`` evaluator of the original graph as reference.

    Raises:
        ModelImportError: For invalid models, unsupported operators or structures.
    """
    archive = read_onnx_archive(data, max_bytes=max_bytes) if is_zip(data) else None
    model = parse_onnx(data if archive is None else archive.model, archive, max_bytes=max_bytes)
    return _OnnxTranslator(model, input_shape).translate()


class _OnnxTranslator:
    def __init__(self, model: onnx.ModelProto, input_shape: Sequence[int] | None) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), onnx.defs.onnx_opset_version()
        )
        self.caller_shape = None if input_shape is None else tuple(input_shape)
        self.consts: dict[str, np.ndarray] = {}
        self.syms: dict[str, _Sym] = {}
        self.thresholds: dict[str, _Threshold] = {}
        self.static_batch: int | None = None
        self.builder: ProgramBuilder | None = None

    # -- driver -------------------------------------------------------------------------------------

    def translate(self) -> Translation:
        if self.model.functions:
            raise ModelImportError(
                "unsupported_graph",
                "models with local functions are not supported; export without module functions",
                {"functions": [f.name for f in self.model.functions]},
            )
        self._check_ops()
        for init in self.graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        if len(self.graph.sparse_initializer):
            raise ModelImportError("unsupported_graph", "sparse initializers are not supported")
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            raise ModelImportError(
                "unsupported_graph",
                f"the model must have one input and one output, found {len(inputs)} and {len(self.graph.output)}",
                {"inputs": [i.name for i in inputs], "outputs": [o.name for o in self.graph.output]},
            )
        graph_input = inputs[0]
        input_dtype, shape = self._input_signature(graph_input)

        nodes = list(self.graph.node)
        output_name = self.graph.output[0].name
        activation, activation_node = None, None
        if nodes and nodes[-1].op_type in _FINAL_ACTIVATIONS and list(nodes[-1].output) == [output_name]:
            activation_node = nodes.pop()
            activation = _FINAL_ACTIVATIONS[activation_node.op_type]
            logits_name = activation_node.input[0]
        else:
            logits_name = output_name

        uses: Counter[str] = Counter(name for node in nodes for name in node.input if name)
        uses[logits_name] += 1
        self.builder = ProgramBuilder(graph_input.name, shape, uses)
        for node in nodes:
            self._translate_node(node)

        if activation_node is not None and activation != "sigmoid":
            axis = _attributes(activation_node).get("axis", -1 if self.opset >= 13 else 1)
            try:
                check_class_axis(axis, activation_node.op_type)
            except OpRefused as refusal:
                raise _fail_op(activation_node, refusal.reason) from None
        return finish_translation(
            self.builder,
            logits_name,
            shape,
            activation,
            self.static_batch or 2,
            self._reference(graph_input.name, output_name, input_dtype),
        )

    def _check_ops(self) -> None:
        bad = sorted(
            {
                n.op_type if n.domain in _DEFAULT_DOMAINS else f"{n.domain}::{n.op_type}"
                for n in self.graph.node
                if n.domain not in _DEFAULT_DOMAINS or n.op_type not in SUPPORTED_OPS
            }
        )
        if bad:
            raise ModelImportError(
                "unsupported_op",
                f"unsupported ONNX operator(s): {', '.join(bad)}",
                {"ops": bad, "supported": sorted(SUPPORTED_OPS)},
            )

    def _input_signature(self, graph_input: onnx.ValueInfoProto) -> tuple[type, tuple[int, ...]]:
        ttype = graph_input.type.tensor_type
        if not graph_input.type.HasField("tensor_type") or ttype.elem_type not in _FLOAT_INPUTS:
            raise ModelImportError(
                "unsupported_graph",
                "the model input must be a float32 or float64 tensor",
                {"input": graph_input.name, "elem_type": int(ttype.elem_type)},
            )
        per_example: list[int | None] | None = None
        if ttype.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
            self.static_batch, per_example = split_batch_dim(dims)
        shape = resolve_input_shape(per_example, self.caller_shape)
        return _FLOAT_INPUTS[ttype.elem_type], shape

    def _reference(self, input_name: str, output_name: str, dtype: type) -> Callable[[Tensor], Tensor]:
        from onnx.reference import ReferenceEvaluator

        # onnx.reference's BatchNormalization before opset 14 blends in the probe's batch statistics;
        # inference-mode models (the only ones imported) normalise with the stored statistics.
        overrides = [_inference_batch_norm()] if self.opset < 14 else None
        evaluator = ReferenceEvaluator(self.model, new_ops=overrides)

        def run(probe: Tensor) -> Tensor:
            try:
                (out,) = evaluator.run([output_name], {input_name: probe.detach().cpu().numpy().astype(dtype)})
            except Exception as exc:
                raise ModelImportError(
                    "invalid_onnx",
                    f"the original ONNX graph fails on a probe of shape {tuple(probe.shape)}: {exc}",
                ) from None
            return _float_tensor(out)

        return run

    # -- value helpers ------------------------------------------------------------------------------

    def _kind(self, name: str) -> str:
        if not name:
            return "none"
        if self.builder is not None and self.builder.is_activation(name):
            return "act"
        if name in self.consts:
            return "const"
        if name in self.syms:
            return "sym"
        if name in self.thresholds:
            return "threshold"
        raise ModelImportError("invalid_onnx", f"tensor {name!r} is used before it is defined")

    def _const(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        if self._kind(name) != "const":
            raise _fail_op(node, f"{what} must be a constant")
        return self.consts[name]

    def _opt_const(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            return None
        if self._kind(name) != "const":
            raise _fail_op(node, f"input {index} must be a constant")
        return self.consts[name]

    def _act(self, node: onnx.NodeProto, index: int = 0) -> str:
        name = node.input[index]
        if self._kind(name) != "act":
            raise _fail_op(node, f"input {index} must be an activation computed from the model input")
        return name

    # -- node dispatch ------------------------------------------------------------------------------

    def _translate_node(self, node: onnx.NodeProto) -> None:
        attrs = _attributes(node)
        if len([o for o in node.output if o]) == 0:
            return
        kinds = [self._kind(i) for i in node.input]
        if node.op_type == "Constant":
            self._op_constant(node, attrs)
        elif "act" not in kinds and "threshold" not in kinds:
            self._fold_static(node, attrs, kinds)
        else:
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                raise _fail_op(node, "only supported on constants or as the model's last operator")
            try:
                handler(node, attrs)
            except OpRefused as refusal:
                raise _fail_op(node, refusal.reason, refusal.code, **refusal.detail) from None

    def _op_constant(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        if "value" in attrs:
            value = np.asarray(attrs["value"])
        elif "value_float" in attrs:
            value = np.asarray(attrs["value_float"], dtype=np.float32)
        elif "value_floats" in attrs:
            value = np.asarray(attrs["value_floats"], dtype=np.float32)
        elif "value_int" in attrs:
            value = np.asarray(attrs["value_int"], dtype=np.int64)
        elif "value_ints" in attrs:
            value = np.asarray(attrs["value_ints"], dtype=np.int64)
        else:
            raise _fail_op(node, "only tensor, float(s) and int(s) constants are supported")
        self.consts[node.output[0]] = value

    # -- constants and shape values -----------------------------------------------------------------

    def _fold_static(self, node: onnx.NodeProto, attrs: dict[str, Any], kinds: list[str]) -> None:
        """Evaluate a node whose inputs are constants or shape values."""
        op = node.op_type
        if "sym" in kinds or op == "Shape":
            self._fold_sym(node, attrs)
            return
        x = [self.consts[i] if i else None for i in node.input]
        if op in ("Add", "Sub", "Mul", "Div"):
            size = math.prod(np.broadcast_shapes(x[0].shape, x[1].shape))
        elif op == "Gather":
            size = x[1].size * (x[0].size // max(x[0].shape[attrs.get("axis", 0)], 1))
        else:
            size = sum(v.size for v in x if v is not None)
        if size > MAX_ACTIVATION_ELEMENTS:
            raise ModelImportError("too_large", f"ONNX {op} on constants would produce {size} values")
        out: np.ndarray
        if op in ("Identity", "Dropout"):
            out = x[0]
        elif op == "Cast":
            out = x[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
        elif op == "Transpose":
            out = np.transpose(x[0], attrs.get("perm"))
        elif op == "Reshape":
            shape = [int(d) for d in x[1]]
            if not attrs.get("allowzero", 0):
                shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
            out = x[0].reshape(shape)
        elif op in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes") if self.opset < 13 else (None if len(x) < 2 else x[1])
            out = x[0]
            if op == "Squeeze":
                out = np.squeeze(out, axis=None if axes is None else tuple(int(a) for a in axes))
            else:
                for a in sorted(int(a) % (out.ndim + len(axes)) for a in axes):
                    out = np.expand_dims(out, a)
        elif op == "Concat":
            out = np.concatenate([v for v in x if v is not None], axis=attrs["axis"])
        elif op == "Gather":
            out = np.take(x[0], x[1], axis=attrs.get("axis", 0))
        elif op in ("Add", "Sub", "Mul", "Div"):
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
            out = fn(x[0], x[1]).astype(np.result_type(x[0], x[1]))
        else:
            raise _fail_op(node, "operator on constants only is not supported")
        self.consts[node.output[0]] = np.asarray(out)

    def _fold_sym(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        op = node.op_type
        if op == "Shape":
            kind = self._kind(node.input[0])
            if kind == "const":
                values: tuple[int | None, ...] = tuple(self.consts[node.input[0]].shape)
            elif kind == "act":
                values = (None, *self.builder.shape(node.input[0]))
            else:
                raise _fail_op(node, "Shape of a shape value is not supported")
            start, end = attrs.get("start", 0), attrs.get("end", None)
            self._set_sym(node.output[0], _Sym(values[start:end]))
            return
        if op in ("Identity", "Cast"):
            self.syms[node.output[0]] = self.syms[node.input[0]]
            return
        sym = self._sym_or_const(node, 0)
        if op == "Gather":
            if attrs.get("axis", 0) != 0 or sym.scalar:
                raise _fail_op(node, "Gather on a shape value must index axis 0 of a 1-D shape")
            idx = self._const(node, 1, "indices")
            picked = tuple(sym.values[int(i)] for i in np.ravel(idx))
            self._set_sym(node.output[0], _Sym(picked, scalar=idx.ndim == 0))
        elif op == "Unsqueeze":
            if not sym.scalar:
                raise _fail_op(node, "Unsqueeze of a 1-D shape value is not supported")
            self._set_sym(node.output[0], _Sym(sym.values))
        elif op == "Squeeze":
            if sym.scalar or len(sym.values) != 1:
                raise _fail_op(node, "Squeeze of a shape value must give a scalar")
            self._set_sym(node.output[0], _Sym(sym.values, scalar=True))
        elif op == "Concat":
            parts: list[int | None] = []
            for i in range(len(node.input)):
                part = self._sym_or_const(node, i)
                if part.scalar:
                    raise _fail_op(node, "Concat of scalar shape values is not supported")
                parts.extend(part.values)
            self._set_sym(node.output[0], _Sym(tuple(parts)))
        elif op == "Slice":
            starts, ends = self._const(node, 1, "starts"), self._const(node, 2, "ends")
            axes, steps = self._opt_const(node, 3), self._opt_const(node, 4)
            if sym.scalar or (axes is not None and [int(a) for a in axes] not in ([0], [-1])):
                raise _fail_op(node, "Slice of a shape value must slice its only axis")
            step = 1 if steps is None else int(steps[0])
            sliced = sym.values[slice(int(starts[0]), int(ends[0]), step)]
            self._set_sym(node.output[0], _Sym(tuple(sliced)))
        else:
            raise _fail_op(node, "arithmetic on shape values is not supported")

    def _sym_or_const(self, node: onnx.NodeProto, index: int) -> _Sym:
        name = node.input[index]
        if self._kind(name) == "sym":
            return self.syms[name]
        if self._kind(name) == "const":
            value = self.consts[name]
            if value.ndim > 1 or not np.issubdtype(value.dtype, np.integer):
                raise _fail_op(node, "shape values must be 0-D or 1-D integers")
            return _Sym(tuple(int(v) for v in np.ravel(value)), scalar=value.ndim == 0)
        raise _fail_op(node, f"input {index} must be a shape value")

    def _set_sym(self, name: str, sym: _Sym) -> None:
        if None in sym.values:
            self.syms[name] = sym
        else:
            value = np.asarray(sym.values, dtype=np.int64)
            self.consts[name] = value.reshape(()) if sym.scalar else value

    def _op_Shape(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._fold_sym(node, attrs)

    # -- layers -------------------------------------------------------------------------------------

    @staticmethod
    def _layer_name(weight_name: str) -> str | None:
        return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else None

    def _op_Gemm(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        if attrs.get("transA", 0):
            raise _fail_op(node, "transA=1 would transpose the batch dimension")
        b = self._const(node, 1, "B (the weight)").astype(np.float32)
        c = self._opt_const(node, 2)
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if b.ndim != 2 or len(self.builder.shape(x)) != 1:
            raise _fail_op(node, "Gemm needs a 2-D weight and a (batch, features) input")
        weight = alpha * (b if attrs.get("transB", 0) else b.T)
        bias = None if c is None else beta * _float_tensor(c)
        self._add_linear(node, x, _float_tensor(weight), bias)

    def _op_MatMul(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        b = self._const(node, 1, "the second operand (the weight)")
        if b.ndim != 2:
            raise _fail_op(node, "MatMul needs a constant 2-D weight as second operand")
        self._add_linear(node, x, _float_tensor(b).T, None)

    def _add_linear(self, node: onnx.NodeProto, x: str, weight: Tensor, bias: Tensor | None) -> None:
        name = self._layer_name(node.input[1])
        self.builder.add(linear_layer(weight, bias), [x], node.output[0], kind="linear", name=name, op=node.op_type)

    def _op_Conv(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        w = self._const(node, 1, "the weight").astype(np.float32)
        b = self._opt_const(node, 2)
        if w.ndim != 4 or len(self.builder.shape(x)) != 3:
            raise _fail_op(node, "only 2-D convolutions (NCHW input, 4-D weight) are supported")
        kernel = tuple(int(k) for k in w.shape[2:])
        if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != kernel:
            raise _fail_op(node, "kernel_shape does not match the weight")
        strides = tuple(attrs.get("strides", (1, 1)))
        dilations = tuple(attrs.get("dilations", (1, 1)))
        groups = int(attrs.get("group", 1))
        add_conv2d(
            self.builder,
            x,
            node.output[0],
            _float_tensor(w),
            None if b is None else _float_tensor(b),
            stride=strides,
            pads=self._pads(node, attrs, kernel, strides, dilations),
            dilation=dilations,
            groups=groups,
            op=node.op_type,
            name=self._layer_name(node.input[1]),
        )

    def _pads(
        self,
        node: onnx.NodeProto,
        attrs: dict[str, Any],
        kernel: Sequence[int],
        strides: Sequence[int],
        dilations: Sequence[int],
    ) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` padding from ``pads`` / ``auto_pad``."""
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if auto_pad in ("NOTSET", ""):
            pads = tuple(int(p) for p in attrs.get("pads", (0, 0, 0, 0)))
            if len(pads) != 4 or min(pads) < 0:
                raise _fail_op(node, f"pads {list(pads)} are not 2-D")
            return pads  # type: ignore[return-value]
        if auto_pad == "VALID":
            return (0, 0, 0, 0)
        if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            raise _fail_op(node, f"auto_pad={auto_pad} is not supported")
        spatial = self.builder.shape(node.input[0])[1:]
        return same_pads(spatial, kernel, strides, dilations, upper=auto_pad == "SAME_UPPER")

    def _op_BatchNormalization(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        training = attrs.get("training_mode", 0) or not attrs.get("is_test", 1)
        if training or any(o for o in node.output[1:]):
            raise _fail_op(node, "only inference-mode batch normalisation is supported")
        gamma, beta, mean, var = (torch.tensor(self._const(node, i, n), dtype=torch.float64) for i, n in
                                  ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))  # fmt: skip
        add_batch_norm(
            self.builder,
            x,
            node.output[0],
            mean=mean,
            var=var,
            eps=float(attrs.get("epsilon", 1e-5)),
            weight=gamma,
            bias=beta,
            op=node.op_type,
            name="batchnorm",
        )

    # -- activations --------------------------------------------------------------------------------

    def _activation(self, node: onnx.NodeProto, module: nn.Module, kind: str) -> None:
        self.builder.add(module, [self._act(node, 0)], node.output[0], kind=kind, op=node.op_type)

    def _op_activation(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        kind, params = _ACTIVATIONS[node.op_type]
        self._activation(node, activation_module(kind, **params(attrs)), kind)

    _op_Relu = _op_LeakyRelu = _op_Tanh = _op_Sigmoid = _op_Elu = _op_Softplus = _op_Gelu = _op_activation
    _op_Selu = _op_Mish = _op_HardSwish = _op_HardSigmoid = _op_activation

    def _op_PRelu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        slope = _float_tensor(self._const(node, 1, "the slope"))
        module = prelu_module(slope, self.builder.shape(x), channel_first=False)
        self.builder.add(module, [x], node.output[0], kind="prelu", op=node.op_type)

    def _op_Concat(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        inputs = [self._act(node, i) for i in range(len(node.input))]
        add_concat(self.builder, inputs, node.output[0], int(attrs.get("axis", 0)), op=node.op_type)

    def _op_InstanceNormalization(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        module = group_norm_module(
            self.builder.shape(x),
            None,
            float(attrs.get("epsilon", 1e-5)),
            _float_tensor(self._const(node, 1, "the scale")),
            _float_tensor(self._const(node, 2, "the bias")),
        )
        self.builder.add(module, [x], node.output[0], kind="instancenorm", op=node.op_type)

    def _op_LayerNormalization(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        if any(o for o in node.output[1:]):
            raise _fail_op(node, "only the normalised output may be used")
        scale = _float_tensor(self._const(node, 1, "the scale"))
        bias = self._opt_const(node, 2)
        module = layer_norm_module(
            self.builder.shape(x),
            int(attrs.get("axis", -1)),
            float(attrs.get("epsilon", 1e-5)),
            scale,
            None if bias is None else _float_tensor(bias),
        )
        self.builder.add(module, [x], node.output[0], kind="layernorm", op=node.op_type)

    def _op_Clip(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        if self.opset < 11:
            low, high = attrs.get("min", -math.inf), attrs.get("max", math.inf)
        else:
            lo, hi = self._opt_const(node, 1), self._opt_const(node, 2)
            low = -math.inf if lo is None else float(lo)
            high = math.inf if hi is None else float(hi)
        module = clamp_module(low, high)
        self._activation(node, module, type(module).__name__.lower())

    def _op_Greater(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        threshold = self._const(node, 1, "the threshold")
        if threshold.size != 1:
            raise _fail_op(node, "only the scalar threshold of a Softplus pattern is supported")
        self.thresholds[node.output[0]] = _Threshold(self.builder.canonical(x), float(threshold.reshape(())))

    def _op_Where(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        cond, a, b = node.input
        pattern = self.thresholds.get(cond)
        builder = self.builder
        ok = (
            pattern is not None
            and self._kind(a) == "act"
            and self._kind(b) == "act"
            and builder.canonical(a) == pattern.source
            and builder.uses(b) == 1
        )
        produced = builder.producer(b) if ok else None
        if produced is None or not isinstance(produced[0], nn.Softplus) or produced[1] != (pattern.source,):
            raise _fail_op(node, "Where is only supported as the threshold of a Softplus")
        builder.replace_producer(b, nn.Softplus(beta=1.0, threshold=pattern.threshold))
        builder.alias(b, node.output[0])

    def _op_Softmax(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        raise _fail_op(node, "Softmax is only supported as the model's last operator")

    def _op_LogSoftmax(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        raise _fail_op(node, "LogSoftmax is only supported as the model's last operator")

    # -- pooling ------------------------------------------------------------------------------------

    def _pool_settings(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[Any, ...]:
        x = self._act(node, 0)
        if len(self.builder.shape(x)) != 3 or len(attrs.get("kernel_shape", ())) != 2:
            raise _fail_op(node, "only 2-D pooling on NCHW inputs is supported")
        if len([o for o in node.output if o]) > 1:
            raise _fail_op(node, "the Indices output is not supported")
        kernel = tuple(int(k) for k in attrs["kernel_shape"])
        strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
        dilations = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
        top, left, bottom, right = self._pads(node, attrs, kernel, strides, dilations)
        if (top, left) != (bottom, right):
            raise _fail_op(node, "asymmetric pooling pads are not supported")
        return x, kernel, strides, (top, left), dilations, bool(attrs.get("ceil_mode", 0))

    def _op_MaxPool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x, kernel, strides, padding, dilations, ceil_mode = self._pool_settings(node, attrs)
        pool = nn.MaxPool2d(kernel, strides, padding, dilations, ceil_mode=ceil_mode)
        self.builder.add(pool, [x], node.output[0], kind="maxpool", op=node.op_type)

    def _op_AveragePool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x, kernel, strides, padding, dilations, ceil_mode = self._pool_settings(node, attrs)
        if dilations != (1, 1):
            raise _fail_op(node, "dilated average pooling is not supported")
        pool = nn.AvgPool2d(
            kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=bool(attrs.get("count_include_pad", 0))
        )
        self.builder.add(pool, [x], node.output[0], kind="avgpool", op=node.op_type)

    def _op_GlobalAveragePool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        if len(self.builder.shape(x)) != 3:
            raise _fail_op(node, "only NCHW inputs are supported")
        self.builder.add(nn.AdaptiveAvgPool2d(1), [x], node.output[0], kind="avgpool", op=node.op_type)

    def _op_GlobalMaxPool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        if len(self.builder.shape(x)) != 3:
            raise _fail_op(node, "only NCHW inputs are supported")
        self.builder.add(nn.AdaptiveMaxPool2d(1), [x], node.output[0], kind="maxpool", op=node.op_type)

    def _op_ReduceMean(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        shape = self.builder.shape(x)
        rank = len(shape) + 1
        if self.opset >= 18:
            axes_value = self._opt_const(node, 1)
            axes = None if axes_value is None or axes_value.size == 0 else [int(a) for a in np.ravel(axes_value)]
        else:
            axes = attrs.get("axes")
        keepdims = bool(attrs.get("keepdims", 1))
        if axes is None:
            if attrs.get("noop_with_empty_axes", 0):
                self.builder.alias(x, node.output[0])
                return
            raise _fail_op(node, "reducing over all axes would mix the batch")
        dims = example_dims(axes, rank)
        if rank == 4 and dims == [2, 3]:
            if keepdims:
                self.builder.add(nn.AdaptiveAvgPool2d(1), [x], node.output[0], kind="avgpool", op=node.op_type)
            else:
                pooled = f"{node.output[0]}::pooled"
                self.builder.add(nn.AdaptiveAvgPool2d(1), [x], pooled, kind="avgpool", op=node.op_type)
                self.builder.reshape(pooled, node.output[0], (shape[0],), op=node.op_type)
            return
        self.builder.add(Mean(dims, keepdims), [x], node.output[0], kind="mean", op=node.op_type)

    # -- shape --------------------------------------------------------------------------------------

    def _op_Flatten(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        shape = self.builder.shape(x)
        axis = int(attrs.get("axis", 1))
        if (axis + len(shape) + 1 if axis < 0 else axis) != 1:
            raise _fail_op(node, f"Flatten(axis={axis}) would merge the batch dimension")
        self.builder.reshape(x, node.output[0], (math.prod(shape),), op=node.op_type)

    def _op_Reshape(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        kind = self._kind(node.input[1])
        if kind == "const":
            target: list[int | None] = [int(d) for d in np.ravel(self.consts[node.input[1]])]
        elif kind == "sym" and not self.syms[node.input[1]].scalar:
            target = list(self.syms[node.input[1]].values)
        else:
            raise _fail_op(node, "the target shape must be a constant or computed from input shapes")
        allowzero = bool(attrs.get("allowzero", 0))
        shape = resolve_reshape(
            target,
            self.builder.shape(x),
            static_batch=self.static_batch,
            zero_copies=not allowzero,
            op=node.op_type,
        )
        self.builder.reshape(x, node.output[0], shape, op=node.op_type)

    def _axes(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[int] | None:
        if self.opset >= 13:
            value = self._opt_const(node, 1)
            return None if value is None else [int(a) for a in np.ravel(value)]
        axes = attrs.get("axes")
        return None if axes is None else [int(a) for a in axes]

    def _op_Squeeze(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        shape = self.builder.shape(x)
        axes = self._axes(node, attrs)
        rank = len(shape) + 1
        if axes is None:
            dims = [i + 1 for i, d in enumerate(shape) if d == 1]
        else:
            dims = sorted({a % rank for a in axes})
        if 0 in dims or any(shape[d - 1] != 1 for d in dims):
            raise _fail_op(node, f"cannot squeeze axes {axes} of an example of shape {shape}")
        new = tuple(d for i, d in enumerate(shape, start=1) if i not in dims)
        self.builder.reshape(x, node.output[0], new, op=node.op_type)

    def _op_Unsqueeze(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        shape = list(self.builder.shape(x))
        axes = self._axes(node, attrs)
        if not axes:
            raise _fail_op(node, "Unsqueeze needs axes")
        rank = len(shape) + 1 + len(axes)
        dims = sorted({a % rank for a in axes})
        if 0 in dims:
            raise _fail_op(node, "inserting a dimension before the batch is not supported")
        full: list[int | None] = [None, *shape]
        for d in dims:
            full.insert(d, 1)
        self.builder.reshape(x, node.output[0], [int(d) for d in full[1:]], op=node.op_type)

    def _op_Identity(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self.builder.alias(self._act(node, 0), node.output[0])

    def _op_Dropout(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._act(node, 0)
        training = self._opt_const(node, 2) if self.opset >= 12 else None
        if (training is not None and bool(np.ravel(training)[0])) or any(o for o in node.output[1:]):
            raise _fail_op(node, "only inference-mode Dropout without a mask output is supported")
        self.builder.alias(x, node.output[0])

    def _op_Cast(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        if attrs.get("to") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            raise _fail_op(node, "activations may only be cast to float32 or float64")
        self.builder.alias(self._act(node, 0), node.output[0])

    # -- arithmetic ---------------------------------------------------------------------------------

    def _op_Add(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        operands: list[str | Tensor] = []
        for name in node.input:
            kind = self._kind(name)
            if kind not in ("act", "const"):
                raise _fail_op(node, "operands must be activations or constants, not shape values")
            operands.append(name if kind == "act" else _float_tensor(self.consts[name]))
        op = node.op_type
        add_arithmetic(self.builder, _ARITHMETIC[op], *operands, node.output[0], op=op, name=op.lower())

    _op_Sub = _op_Mul = _op_Div = _op_Add
