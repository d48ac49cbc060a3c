"""torch.export (``.pt2``) import: rebuild the exported aten graph from real ``nn`` layers.

The archive is read by :mod:`app.domain.modelio.pt2_archive` (no unpickling, no ``eval``); this module walks the
serialised graph JSON. Supported aten operators (both the default training IR of ``torch.export.export``
and the core-aten form after ``run_decompositions()``):

- layers: ``linear``, ``addmm`` / ``mm`` / ``matmul`` with a constant weight (transposes of constants are
  folded), ``conv2d`` (also with ``padding="same"/"valid"``, rebuilt as integer padding, with an
  ``nn.ZeroPad2d`` in front where "same" is asymmetric), ``convolution`` (2-D, not transposed), zero
  ``constant_pad_nd`` of the spatial dims; ``groups`` > 1 is refused with ``unsupported_layer`` because the
  curvature core cannot fit grouped convolutions;
- activations: ``relu``, ``relu6``, ``hardtanh``, ``leaky_relu``, ``tanh``, ``sigmoid``, ``elu``,
  ``softplus``, ``gelu``, ``selu``, ``mish``, ``hardswish``, ``hardsigmoid``, ``prelu`` (constant slopes),
  ``silu`` (also as ``mul(x, sigmoid(x))``, its core-aten form);
- shape: ``view``, ``reshape``, ``_unsafe_view``, ``flatten``, ``squeeze``, ``unsqueeze``, ``sym_size``;
- pooling: ``max_pool2d`` (and ``_with_indices``), ``avg_pool2d``, ``adaptive_avg_pool2d``, ``mean.dim``;
- other: inference ``batch_norm`` / ``_native_batch_norm_legit_no_training`` (folded into the preceding
  layer when its output has no other use, else a parameter-free per-channel affine), ``add`` / ``sub`` /
  ``mul`` / ``div`` with constants (folded the same way), ``add`` of two activations (residual),
  ``cat`` of activations along a dimension within each example, ``layer_norm`` / ``native_layer_norm`` over
  dimensions within each example, ``group_norm`` and ``instance_norm`` without running statistics (constant
  scales and shifts, kept at their trained values), ``dropout`` / ``feature_dropout`` / ``alpha_dropout`` / ``feature_alpha_dropout``
  (inference), ``clone`` / ``alias`` / ``detach``;
- a final ``softmax`` / ``log_softmax`` / ``sigmoid`` is stripped and reported.

Operator semantics shared with the ONNX importer live in :mod:`app.domain.modelio.ops`. The reference for
the dry run runs the same serialised graph node by node through the whitelisted
``torch.ops.aten`` overloads on real tensors, independently of the module rebuilt here.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ModelImportError
from .modules import Mean
from .ops import (
    OpRefused,
    activation_module,
    add_arithmetic,
    add_batch_norm,
    add_concat,
    add_conv2d,
    check_class_axis,
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
from .pt2_archive import SCALAR_TYPES, Pt2Archive, invalid, read_pt2, sym_int

_TARGET = re.compile(r"^torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")
_FINAL_ACTIVATIONS = {
    "softmax.int": "softmax",
    "_softmax.default": "softmax",
    "log_softmax.int": "log_softmax",
    "_log_softmax.default": "log_softmax",
    "sigmoid.default": "sigmoid",
}
_MEMORY_FORMATS = {1: torch.contiguous_format, 2: torch.channels_last, 4: torch.preserve_format}
_FLOAT_INPUTS = (torch.float32, torch.float64)

#: aten activations: the shared activation kind and the schema arguments that are its parameters.
_ACTIVATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "relu.default": ("relu", ()),
    "relu6.default": ("relu6", ()),
    "hardtanh.default": ("hardtanh", ("min_val", "max_val")),
    "leaky_relu.default": ("leaky_relu", ("negative_slope",)),
    "tanh.default": ("tanh", ()),
    "sigmoid.default": ("sigmoid", ()),
    "silu.default": ("silu", ()),
    "elu.default": ("elu", ("alpha", "scale", "input_scale")),
    "softplus.default": ("softplus", ("beta", "threshold")),
    "gelu.default": ("gelu", ("approximate",)),
    "selu.default": ("selu", ()),
    "mish.default": ("mish", ()),
    "hardswish.default": ("hardswish", ()),
    "hardsigmoid.default": ("hardsigmoid", ()),
}
_ARITHMETIC = {f"{kind}.{overload}": kind for kind in ("add", "sub", "mul", "div") for overload in ("Tensor", "Scalar")}

SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        *_ACTIVATIONS, *_ARITHMETIC, *_FINAL_ACTIVATIONS, "linear.default", "addmm.default", "mm.default",
        "matmul.default", "conv2d.default", "conv2d.padding", "convolution.default", "constant_pad_nd.default",
        "view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints", "squeeze.dim",
        "squeeze.dims", "unsqueeze.default", "sym_size.int", "max_pool2d.default",
        "max_pool2d_with_indices.default", "avg_pool2d.default", "adaptive_avg_pool2d.default",
        "_adaptive_avg_pool2d.default", "mean.dim", "batch_norm.default",
        "_native_batch_norm_legit_no_training.default", "dropout.default", "feature_dropout.default",
        "alpha_dropout.default", "feature_alpha_dropout.default", "prelu.default", "layer_norm.default",
        "native_layer_norm.default", "group_norm.default", "instance_norm.default", "cat.default", "clone.default", "alias.default",
        "detach.default", "permute.default", "t.default", "transpose.int",
    }
)  # fmt: skip
_CONSTANT_ONLY = {"permute.default", "t.default", "transpose.int"}
_CONSTANT_FOLDABLE = _CONSTANT_ONLY | {
    "view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints", "squeeze.dim",
    "squeeze.dims", "unsqueeze.default", "clone.default", "alias.default", "detach.default", "add.Tensor",
    "sub.Tensor", "mul.Tensor", "div.Tensor", "add.Scalar", "sub.Scalar", "mul.Scalar", "div.Scalar",
}  # fmt: skip


@dataclass(frozen=True)
class _Ref:
    """A reference to a named graph value (tensor or symbolic integer)."""

    name: str


@dataclass
class _Node:
    op: str  # "name.overload" of an aten operator
    args: dict[str, Any]  # serialised argument name -> decoded value (with _Ref leaves)
    outputs: list[str | None]
    module_path: str | None


def _aten(op: str) -> Any:
    """The ``torch.ops.aten`` overload for a whitelisted ``name.overload``."""
    if op not in SUPPORTED_OPS:
        raise AssertionError(op)
    name, overload = op.split(".")
    return getattr(getattr(torch.ops.aten, name), overload)


def _fail_op(node: _Node, reason: str, code: str = "unsupported_op", **detail: Any) -> ModelImportError:
    return ModelImportError(code, f"aten.{node.op}: {reason}", {"op": f"aten.{node.op}", "reason": reason, **detail})


def translate_pt2(data: bytes, input_shape: Sequence[int] | None, *, max_bytes: int) -> Translation:
    """Rebuild a ``torch.export.save`` archive as a torch module.

    Args:
        data: The archive bytes.
        input_shape: Per-example input shape; required when the program leaves non-batch dims dynamic.
        max_bytes: Upper bound on the archive's uncompressed size.

    Returns:
        The rebuilt module with a reference that runs the serialised aten graph.

    Raises:
        ModelImportError: For unsafe, malformed or unsupported archives.
    """
    archive = read_pt2(data, max_bytes=max_bytes)
    return _Pt2Translator(archive, None if input_shape is None else tuple(input_shape)).translate()


# -- parsing the serialised graph -------------------------------------------------------------------


def _one_key(value: Any, where: str) -> tuple[str, Any]:
    if not isinstance(value, dict) or len(value) != 1:
        raise invalid(f"malformed {where}: {str(value)[:120]}")
    return next(iter(value.items()))


def _tensor_name(value: Any, where: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise invalid(f"malformed tensor reference in {where}")
    return value["name"]


def _number(value: Any) -> float:
    if isinstance(value, str) and value in ("Infinity", "-Infinity", "NaN"):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise invalid(f"malformed float {str(value)[:40]!r}")


def _sym_or_ref(value: Any) -> int | _Ref:
    kind, inner = _one_key(value, "symbolic integer")
    if kind == "as_name" and isinstance(inner, str):
        return _Ref(inner)
    if kind == "as_int" and isinstance(inner, int):
        return inner
    raise invalid(f"malformed symbolic integer {str(value)[:80]}")


def _decode_argument(arg: Any, where: str) -> Any:
    kind, value = _one_key(arg, f"argument of {where}")
    if kind == "as_none":
        return None
    if kind == "as_tensor":
        return _Ref(_tensor_name(value, where))
    if kind == "as_tensors" and isinstance(value, list):
        return [_Ref(_tensor_name(v, where)) for v in value]
    if kind in ("as_optional_tensors",) and isinstance(value, list):
        return [_decode_argument(v, where) for v in value]
    if kind == "as_optional_tensor":
        return _decode_argument(value, where)
    if kind in ("as_int", "as_bool", "as_string") and isinstance(value, (int, bool, str)):
        return value
    if kind in ("as_ints", "as_bools", "as_strings") and isinstance(value, list):
        return list(value)
    if kind == "as_float":
        return _number(value)
    if kind == "as_floats" and isinstance(value, list):
        return [_number(v) for v in value]
    if kind == "as_sym_int":
        return _sym_or_ref(value)
    if kind == "as_sym_ints" and isinstance(value, list):
        return [_sym_or_ref(v) for v in value]
    if kind == "as_memory_format" and value in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[value]
    if kind == "as_scalar_type" and value in SCALAR_TYPES:
        return SCALAR_TYPES[value]
    raise ModelImportError(
        "unsupported_op", f"{where}: argument kind {kind!r} is not supported", {"op": where, "argument": kind}
    )


def _module_path(metadata: Any) -> str | None:
    """The innermost module path recorded in a node's ``nn_module_stack`` metadata, if any."""
    stack = metadata.get("nn_module_stack") if isinstance(metadata, dict) else None
    if not isinstance(stack, str) or not stack:
        return None
    parts = stack.split(";")[-1].split(",")
    return parts[1] if len(parts) >= 3 and parts[1] else None


def _op_name(target: str) -> str:
    """``name.overload`` for an aten target string, else the target itself."""
    match = _TARGET.match(target)
    return f"{match.group(1)}.{match.group(2)}" if match else target


def _check_ops(raw_nodes: list[Any]) -> None:
    """Refuse the graph, naming every operator outside the supported set, before anything else is read."""
    targets = [n.get("target") if isinstance(n, dict) else None for n in raw_nodes]
    if not all(isinstance(t, str) for t in targets):
        raise invalid("malformed graph node")
    bad = sorted({t for t in targets if _op_name(t) not in SUPPORTED_OPS})
    if bad:
        names = [f"aten.{_op_name(t)}" if _TARGET.match(t) else t for t in bad]
        raise ModelImportError(
            "unsupported_op",
            f"unsupported operator(s): {', '.join(names)}",
            {"op": names[0], "ops": names, "supported": sorted(f"aten.{op}" for op in SUPPORTED_OPS)},
        )


def _parse_node(raw: Any) -> _Node:
    if not isinstance(raw, dict) or not isinstance(raw.get("target"), str):
        raise invalid("malformed graph node")
    target = raw["target"]
    op = _op_name(target)
    args: dict[str, Any] = {}
    for item in raw.get("inputs") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid(f"malformed input of {target}")
        args[item["name"]] = _decode_argument(item.get("arg"), f"aten.{op}")
    outputs: list[str | None] = []
    for out in raw.get("outputs") or []:
        kind, value = _one_key(out, f"output of {target}")
        if kind == "as_tensor":
            outputs.append(_tensor_name(value, target))
        elif kind == "as_tensors" and isinstance(value, list):
            outputs.extend(_tensor_name(v, target) for v in value)
        elif kind == "as_sym_int":
            ref = _sym_or_ref(value)
            outputs.append(ref.name if isinstance(ref, _Ref) else None)
        elif kind == "as_none":
            outputs.append(None)
        else:
            raise invalid(f"unsupported output kind {kind!r} of {target}")
    return _Node(op=op, args=args, outputs=outputs, module_path=_module_path(raw.get("metadata")))


def _refs(value: Any):
    if isinstance(value, _Ref):
        yield value.name
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


# -- translation ------------------------------------------------------------------------------------


class _Pt2Translator:
    def __init__(self, archive: Pt2Archive, caller_shape: tuple[int, ...] | None) -> None:
        self.archive = archive
        self.caller_shape = caller_shape
        self.consts: dict[str, Tensor] = {}
        self.origin: dict[str, str] = {}  # constant name -> fully qualified name of the parameter
        self.ints: dict[str, int | None] = {}  # symbolic integer name -> value (None: the batch size)
        self.static_batch: int | None = None
        self.builder: ProgramBuilder | None = None

    def translate(self) -> Translation:
        program = self.archive.program
        try:
            graph_module = program["graph_module"]
            graph, signature = graph_module["graph"], graph_module["signature"]
            raw_nodes, tensor_values = graph["nodes"], graph["tensor_values"]
            input_specs, output_specs = signature["input_specs"], signature["output_specs"]
        except (KeyError, TypeError):
            raise invalid("the exported program lacks graph_module.graph / signature") from None
        if not isinstance(raw_nodes, list) or not isinstance(tensor_values, dict):
            raise invalid("malformed graph")
        _check_ops(raw_nodes)
        nodes = [_parse_node(n) for n in raw_nodes]
        input_name = self._bind_inputs(input_specs)
        output_name = self._output(output_specs)
        input_dtype, shape = self._input_signature(tensor_values.get(input_name), input_name)

        producers = {o: n for n in nodes for o in n.outputs if o}
        uses: Counter[str] = Counter(r for n in nodes for v in n.args.values() for r in _refs(v))
        activation, logits_name, skipped = None, output_name, None
        last = producers.get(output_name)
        if last is not None and last.op in _FINAL_ACTIVATIONS and uses[output_name] == 0:
            source = last.args.get("self")
            if isinstance(source, _Ref):
                activation, logits_name, skipped = _FINAL_ACTIVATIONS[last.op], source.name, last
        uses[logits_name] += 1

        self.builder = ProgramBuilder(input_name, shape, uses)
        for node in nodes:
            if node is not skipped:
                self._translate_node(node)
        if skipped is not None and activation != "sigmoid":
            try:
                check_class_axis(self._bind(skipped)["dim"], "softmax")
            except OpRefused as refusal:
                raise _fail_op(skipped, refusal.reason) from None
        return finish_translation(
            self.builder,
            logits_name,
            shape,
            activation,
            self.static_batch or 2,
            self._reference(nodes, input_name, output_name, input_dtype),
        )

    # -- signature ----------------------------------------------------------------------------------

    def _bind_inputs(self, input_specs: Any) -> str:
        if not isinstance(input_specs, list):
            raise invalid("malformed input_specs")
        user_inputs: list[str] = []
        weights, constants = self.archive.weights, self.archive.constants
        for spec in input_specs:
            kind, value = _one_key(spec, "input spec")
            if kind == "user_input":
                arg_kind, arg = _one_key(value.get("arg") if isinstance(value, dict) else None, "user input")
                if arg_kind != "as_tensor":
                    raise ModelImportError(
                        "unsupported_graph", "the model's inputs must be tensors", {"input_kind": arg_kind}
                    )
                user_inputs.append(_tensor_name(arg, "user input"))
            elif kind in ("parameter", "buffer", "tensor_constant"):
                if not isinstance(value, dict):
                    raise invalid("malformed input spec")
                name = _tensor_name(value.get("arg"), kind)
                fqn = value.get(
                    {"parameter": "parameter_name", "buffer": "buffer_name"}.get(kind, "tensor_constant_name")
                )
                tensor = weights.get(fqn) if fqn in weights else constants.get(fqn)
                if tensor is None:
                    raise invalid(f"{kind} {fqn!r} has no stored tensor", fqn=str(fqn))
                self.consts[name] = tensor
                self.origin[name] = str(fqn)
            else:
                raise ModelImportError(
                    "unsupported_graph", f"graph inputs of kind {kind!r} are not supported", {"input_kind": kind}
                )
        if len(user_inputs) != 1:
            raise ModelImportError(
                "unsupported_graph", f"the model must take exactly one tensor input, found {len(user_inputs)}"
            )
        return user_inputs[0]

    @staticmethod
    def _output(output_specs: Any) -> str:
        if not isinstance(output_specs, list) or len(output_specs) != 1:
            raise ModelImportError(
                "unsupported_graph",
                "the model must return exactly one tensor and mutate no state",
                {"outputs": len(output_specs) if isinstance(output_specs, list) else None},
            )
        kind, value = _one_key(output_specs[0], "output spec")
        arg_kind, arg = _one_key(value.get("arg") if isinstance(value, dict) else None, "output")
        if kind != "user_output" or arg_kind != "as_tensor":
            raise ModelImportError("unsupported_graph", f"unsupported model output of kind {kind!r}")
        return _tensor_name(arg, "output")

    def _input_signature(self, meta: Any, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if not isinstance(meta, dict) or not isinstance(meta.get("sizes"), list):
            raise invalid(f"the input {name!r} has no tensor metadata")
        dtype = SCALAR_TYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
        if dtype not in _FLOAT_INPUTS:
            raise ModelImportError("unsupported_graph", "the model input must be a float32 or float64 tensor")
        self.static_batch, per_example = split_batch_dim([sym_int(s) for s in meta["sizes"]])
        return dtype, resolve_input_shape(per_example, self.caller_shape)

    # -- values -------------------------------------------------------------------------------------

    def _bind(self, node: _Node) -> dict[str, Any]:
        """Arguments by schema name, with schema defaults filled in."""
        bound: dict[str, Any] = {}
        for arg in _aten(node.op)._schema.arguments:
            if arg.name in node.args:
                bound[arg.name] = node.args[arg.name]
            elif arg.has_default_value():
                bound[arg.name] = arg.default_value
            else:
                raise invalid(f"aten.{node.op} lacks argument {arg.name!r}")
        return bound

    def _kind(self, value: Any) -> str:
        if isinstance(value, _Ref):
            if self.builder.is_activation(value.name):
                return "act"
            if value.name in self.consts:
                return "const"
            if value.name in self.ints:
                return "int"
            raise invalid(f"value {value.name!r} is used before it is defined")
        if value is None:
            return "none"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return "number"
        return "other"

    def _act(self, node: _Node, value: Any, what: str = "input") -> str:
        if self._kind(value) != "act":
            raise _fail_op(node, f"{what} must be an activation computed from the model input")
        return value.name

    def _const(self, node: _Node, value: Any, what: str, *, optional: bool = False) -> Tensor | None:
        kind = self._kind(value)
        if optional and kind == "none":
            return None
        if kind != "const":
            raise _fail_op(node, f"{what} must be a constant")
        return self.consts[value.name]

    def _int(self, node: _Node, value: Any) -> int | None:
        if isinstance(value, _Ref):
            if value.name not in self.ints:
                raise _fail_op(node, "sizes must be integers")
            return self.ints[value.name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail_op(node, "sizes must be integers")
        return value

    def _name(self, node: _Node, weight: Any = None) -> str | None:
        if isinstance(weight, _Ref) and weight.name in self.origin:
            fqn = self.origin[weight.name]
            return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
        return node.module_path

    # -- dispatch -----------------------------------------------------------------------------------

    def _translate_node(self, node: _Node) -> None:
        refs = [r for v in node.args.values() for r in _refs(v)]
        if not any(self.builder.is_activation(r) for r in refs):
            if node.op in ("sym_size.int",):
                raise _fail_op(node, "sym_size must read an activation")
            self._fold_constant(node)
            return
        if node.op in _CONSTANT_ONLY:
            raise _fail_op(node, "only supported on constants (weights)")
        if node.op in _ACTIVATIONS:
            handler = self._activation
        elif node.op in _ARITHMETIC:
            handler = self._arithmetic
        else:
            handler = getattr(self, "_op_" + node.op.split(".")[0].lstrip("_"), None)
        if handler is None:
            raise _fail_op(node, "only supported as the model's last operator or on constants")
        try:
            handler(node, self._bind(node))
        except OpRefused as refusal:
            raise _fail_op(node, refusal.reason, refusal.code, **refusal.detail) from None

    def _fold_constant(self, node: _Node) -> None:
        """Evaluate a node whose inputs are all constants (weight transposes, ...) with its aten operator."""
        if node.op not in _CONSTANT_FOLDABLE:
            raise _fail_op(node, "is only supported on activations computed from the model input")

        def resolve(value: Any) -> Any:
            if isinstance(value, _Ref):
                if value.name in self.consts:
                    return self.consts[value.name]
                raise _fail_op(node, "symbolic sizes on constants are not supported")
            if isinstance(value, list):
                return [resolve(v) for v in value]
            return value

        args = {k: resolve(v) for k, v in node.args.items()}
        tensors = [v for v in args.values() if isinstance(v, Tensor)]
        try:
            size = math.prod(torch.broadcast_shapes(*(t.shape for t in tensors)))
        except RuntimeError:
            size = 0
        if size > MAX_ACTIVATION_ELEMENTS:
            raise ModelImportError("too_large", f"aten.{node.op} on constants would produce {size} values")
        try:
            result = _aten(node.op)(**args)
        except ModelImportError:
            raise
        except Exception as exc:
            raise _fail_op(node, f"cannot evaluate on its constant inputs: {exc}") from None
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        first = next((r.name for v in node.args.values() for r in [v] if isinstance(r, _Ref)), None)
        for name, value in zip(node.outputs, results, strict=False):
            if name is not None and isinstance(value, Tensor):
                self.consts[name] = value
                if first in self.origin:
                    self.origin[name] = self.origin[first]

    # -- layers -------------------------------------------------------------------------------------

    def _add_linear(self, node: _Node, x: str, weight: Tensor, bias: Tensor | None, name: str | None) -> None:
        layer = linear_layer(weight, bias)
        self.builder.add(layer, [x], node.outputs[0], kind="linear", name=name, op=f"aten.{node.op}")

    def _op_linear(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["input"])
        weight = self._const(node, a["weight"], "weight")
        bias = self._const(node, a["bias"], "bias", optional=True)
        self._add_linear(node, x, weight, bias, self._name(node, a["weight"]))

    def _op_addmm(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["mat1"])
        weight = self._const(node, a["mat2"], "mat2 (the weight)")
        bias = self._const(node, a["self"], "the bias")
        if weight.dim() != 2:
            raise _fail_op(node, "the weight must be 2-D")
        alpha, beta = float(a["alpha"]), float(a["beta"])
        self._add_linear(node, x, alpha * weight.T, beta * bias, self._name(node, a["mat2"]))

    def _op_mm(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        weight = self._const(node, a.get("mat2", a.get("other")), "the weight")
        if weight.dim() != 2:
            raise _fail_op(node, "the weight must be 2-D")
        self._add_linear(node, x, weight.T, None, self._name(node, a.get("mat2", a.get("other"))))

    _op_matmul = _op_mm

    def _op_conv2d(self, node: _Node, a: dict[str, Any]) -> None:
        self._conv(node, a, transposed=False)

    def _op_convolution(self, node: _Node, a: dict[str, Any]) -> None:
        self._conv(node, a, transposed=bool(a["transposed"]))

    def _conv(self, node: _Node, a: dict[str, Any], *, transposed: bool) -> None:
        x = self._act(node, a["input"])
        weight = self._const(node, a["weight"], "weight")
        bias = self._const(node, a["bias"], "bias", optional=True)
        if transposed:
            raise _fail_op(node, "transposed convolutions are not supported")
        if weight.dim() != 4 or len(self.builder.shape(x)) != 3:
            raise _fail_op(node, "only 2-D convolutions (NCHW input, 4-D weight) are supported")
        stride, dilation = _pair(node, a["stride"]), _pair(node, a["dilation"])
        padding = a["padding"]
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            # torch pads (k - 1) d in total per axis, the odd pixel at the end: symmetric for odd kernels
            if stride != (1, 1):
                raise _fail_op(node, "padding='same' needs stride 1")
            pads = same_pads(self.builder.shape(x)[1:], weight.shape[2:], stride, dilation, upper=True)
        elif isinstance(padding, str):
            raise _fail_op(node, f"padding={padding!r} is not supported")
        else:
            top, left = _pair(node, padding)
            pads = (top, left, top, left)
        add_conv2d(
            self.builder,
            x,
            node.outputs[0],
            weight,
            bias,
            stride=stride,
            pads=pads,
            dilation=dilation,
            groups=int(a["groups"]),
            op=f"aten.{node.op}",
            name=self._name(node, a["weight"]),
        )

    def _op_constant_pad_nd(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._spatial_input(node, a["self"])
        pad = a["pad"]
        if not (isinstance(pad, list) and len(pad) in (2, 4) and all(isinstance(p, int) and p >= 0 for p in pad)):
            raise _fail_op(node, f"only non-negative padding of the last two dimensions is supported, got {pad!r}")
        if float(a["value"]) != 0.0:
            raise _fail_op(node, "only zero padding is supported")
        left, right, top, bottom = (*pad, 0, 0) if len(pad) == 2 else pad
        pad_module = nn.ZeroPad2d((left, right, top, bottom))
        self.builder.add(pad_module, [x], node.outputs[0], kind="pad", name=node.module_path, op=f"aten.{node.op}")

    # -- activations --------------------------------------------------------------------------------

    def _activation(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        kind, params = _ACTIVATIONS[node.op]
        module = activation_module(kind, **{p: a[p] for p in params})
        self.builder.add(module, [x], node.outputs[0], kind=kind, name=node.module_path, op=f"aten.{node.op}")

    def _op_softmax(self, node: _Node, a: dict[str, Any]) -> None:
        raise _fail_op(node, "softmax is only supported as the model's last operator")

    _op_log_softmax = _op_softmax

    # -- shape --------------------------------------------------------------------------------------

    def _op_sym_size(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        shape = self.builder.shape(x)
        dim = int(a["dim"])
        dim = dim + len(shape) + 1 if dim < 0 else dim
        if not 0 <= dim <= len(shape):
            raise _fail_op(node, f"dimension {a['dim']} is out of range")
        if node.outputs[0] is not None:
            self.ints[node.outputs[0]] = None if dim == 0 else shape[dim - 1]

    def _op_view(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        sizes = a.get("size", a.get("shape"))
        if not isinstance(sizes, list):
            raise _fail_op(node, "the target shape must be a list")
        target = [self._int(node, s) for s in sizes]
        shape = resolve_reshape(
            target, self.builder.shape(x), static_batch=self.static_batch, zero_copies=False, op=f"aten.{node.op}"
        )
        self.builder.reshape(x, node.outputs[0], shape, op=f"aten.{node.op}", name=node.module_path)

    _op_reshape = _op_unsafe_view = _op_view

    def _op_flatten(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        shape = self.builder.shape(x)
        rank = len(shape) + 1
        start, end = (int(a["start_dim"]) % rank, int(a["end_dim"]) % rank) if rank > 0 else (0, 0)
        if start == 0 and end > 0:
            raise _fail_op(node, "flattening the batch dimension into others is not supported")
        if start == 0 or start >= end:
            self.builder.alias(x, node.outputs[0])
            return
        new = (*shape[: start - 1], math.prod(shape[start - 1 : end]), *shape[end:])
        self.builder.reshape(x, node.outputs[0], new, op=f"aten.{node.op}", name=node.module_path)

    def _op_squeeze(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        shape = self.builder.shape(x)
        rank = len(shape) + 1
        dims = a["dim"] if isinstance(a["dim"], list) else [a["dim"]]
        dims = sorted({int(d) % rank for d in dims})
        if 0 in dims:
            raise _fail_op(node, "squeezing the batch dimension is not supported")
        new = tuple(s for i, s in enumerate(shape, start=1) if not (i in dims and s == 1))
        self.builder.reshape(x, node.outputs[0], new, op=f"aten.{node.op}", name=node.module_path)

    def _op_unsqueeze(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        shape = list(self.builder.shape(x))
        dim = int(a["dim"]) % (len(shape) + 2)
        if dim == 0:
            raise _fail_op(node, "inserting a dimension before the batch is not supported")
        shape.insert(dim - 1, 1)
        self.builder.reshape(x, node.outputs[0], shape, op=f"aten.{node.op}", name=node.module_path)

    def _alias(self, node: _Node, a: dict[str, Any]) -> None:
        self.builder.alias(self._act(node, a.get("self", a.get("input"))), node.outputs[0])

    _op_clone = _op_alias = _op_detach = _alias

    def _op_dropout(self, node: _Node, a: dict[str, Any]) -> None:
        if a["train"]:
            raise _fail_op(node, "training-mode dropout is not supported; export the model in eval mode")
        self._alias(node, a)

    _op_feature_dropout = _op_alpha_dropout = _op_feature_alpha_dropout = _op_dropout

    def _op_prelu(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        slope = self._const(node, a["weight"], "the slope")
        module = prelu_module(slope, self.builder.shape(x), channel_first=True)
        self.builder.add(module, [x], node.outputs[0], kind="prelu", name=node.module_path, op=f"aten.{node.op}")

    def _op_cat(self, node: _Node, a: dict[str, Any]) -> None:
        tensors = a["tensors"]
        if not isinstance(tensors, list) or not tensors:
            raise _fail_op(node, "cat needs a list of tensors")
        inputs = [self._act(node, t, "every input") for t in tensors]
        add_concat(self.builder, inputs, node.outputs[0], int(a["dim"]), op=f"aten.{node.op}", name=node.module_path)

    def _op_group_norm(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["input"])
        instance = "num_groups" not in a  # instance_norm: one group per channel
        module = group_norm_module(
            self.builder.shape(x),
            None if instance else int(a["num_groups"]),
            float(a["eps"]),
            self._const(node, a["weight"], "weight", optional=True),
            self._const(node, a["bias"], "bias", optional=True),
        )
        kind = "instancenorm" if instance else "groupnorm"
        self.builder.add(module, [x], node.outputs[0], kind=kind, name=node.module_path, op=f"aten.{node.op}")

    def _op_instance_norm(self, node: _Node, a: dict[str, Any]) -> None:
        if not a["use_input_stats"]:
            raise _fail_op(node, "instance norm with running statistics is not supported")
        self._op_group_norm(node, a)

    def _op_layer_norm(self, node: _Node, a: dict[str, Any]) -> None:
        if any(o is not None and self.builder.graph_uses(o) for o in node.outputs[1:]):
            raise _fail_op(node, "only the normalised output may be used")
        x = self._act(node, a["input"])
        normalized = a["normalized_shape"]
        if not isinstance(normalized, list) or not all(isinstance(d, int) for d in normalized):
            raise _fail_op(node, "the normalised shape must be constant")
        example = self.builder.shape(x)
        k = len(normalized)
        if not 1 <= k <= len(example) or tuple(normalized) != tuple(example[len(example) - k :]):
            raise _fail_op(node, f"normalised shape {normalized} is not a trailing shape of examples {list(example)}")
        module = layer_norm_module(
            example,
            -len(normalized),
            float(a["eps"]),
            self._const(node, a["weight"], "weight", optional=True),
            self._const(node, a["bias"], "bias", optional=True),
        )
        self.builder.add(module, [x], node.outputs[0], kind="layernorm", name=node.module_path, op=f"aten.{node.op}")

    _op_native_layer_norm = _op_layer_norm

    # -- pooling ------------------------------------------------------------------------------------

    def _spatial_input(self, node: _Node, value: Any) -> str:
        x = self._act(node, value)
        if len(self.builder.shape(x)) != 3:
            raise _fail_op(node, "only NCHW inputs are supported")
        return x

    def _op_max_pool2d(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._spatial_input(node, a["self"])
        if any(o is not None and self.builder.graph_uses(o) for o in node.outputs[1:]):
            raise _fail_op(node, "the indices output is not supported")
        kernel = _pair(node, a["kernel_size"])
        stride = _pair(node, a["stride"]) if a["stride"] else kernel
        pool = nn.MaxPool2d(
            kernel, stride, _pair(node, a["padding"]), _pair(node, a["dilation"]), ceil_mode=bool(a["ceil_mode"])
        )
        self.builder.add(pool, [x], node.outputs[0], kind="maxpool", name=node.module_path, op=f"aten.{node.op}")

    _op_max_pool2d_with_indices = _op_max_pool2d

    def _op_avg_pool2d(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._spatial_input(node, a["self"])
        kernel = _pair(node, a["kernel_size"])
        stride = _pair(node, a["stride"]) if a["stride"] else kernel
        pool = nn.AvgPool2d(
            kernel,
            stride,
            _pair(node, a["padding"]),
            ceil_mode=bool(a["ceil_mode"]),
            count_include_pad=bool(a["count_include_pad"]),
            divisor_override=a["divisor_override"],
        )
        self.builder.add(pool, [x], node.outputs[0], kind="avgpool", name=node.module_path, op=f"aten.{node.op}")

    def _op_adaptive_avg_pool2d(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._spatial_input(node, a["self"])
        pool = nn.AdaptiveAvgPool2d(_pair(node, a["output_size"]))
        self.builder.add(pool, [x], node.outputs[0], kind="avgpool", name=node.module_path, op=f"aten.{node.op}")

    def _op_mean(self, node: _Node, a: dict[str, Any]) -> None:
        x = self._act(node, a["self"])
        shape = self.builder.shape(x)
        rank = len(shape) + 1
        if a["dim"] is None or a["dtype"] is not None:
            raise _fail_op(node, "only a mean over given dimensions without dtype is supported")
        module = Mean(example_dims(a["dim"], rank), bool(a["keepdim"]))
        self.builder.add(module, [x], node.outputs[0], kind="mean", name=node.module_path, op=f"aten.{node.op}")

    # -- normalisation and arithmetic ---------------------------------------------------------------

    def _op_batch_norm(self, node: _Node, a: dict[str, Any]) -> None:
        if a.get("training"):
            raise _fail_op(node, "training-mode batch norm is not supported; export the model in eval mode")
        if any(o is not None and self.builder.graph_uses(o) for o in node.outputs[1:]):
            raise _fail_op(node, "only the normalised output may be used")
        x = self._act(node, a["input"])
        mean = self._const(node, a["running_mean"], "running_mean")
        var = self._const(node, a["running_var"], "running_var")
        add_batch_norm(
            self.builder,
            x,
            node.outputs[0],
            mean=mean,
            var=var,
            eps=float(a["eps"]),
            weight=self._const(node, a["weight"], "weight", optional=True),
            bias=self._const(node, a["bias"], "bias", optional=True),
            op=f"aten.{node.op}",
            name=node.module_path,
        )

    _op_native_batch_norm_legit_no_training = _op_batch_norm

    def _arithmetic(self, node: _Node, a: dict[str, Any]) -> None:
        if a.get("rounding_mode") is not None:
            raise _fail_op(node, "rounding division is not supported")
        operands: list[str | Tensor] = []
        for value in (a["self"], a["other"]):
            kind = self._kind(value)
            if kind == "act":
                operands.append(value.name)
            elif kind == "const":
                operands.append(self.consts[value.name].float())
            elif kind == "number":
                operands.append(torch.tensor(float(value)))
            else:
                raise _fail_op(node, "the other operand must be a constant")
        add_arithmetic(
            self.builder,
            _ARITHMETIC[node.op],
            *operands,
            node.outputs[0],
            alpha=a.get("alpha", 1),
            op=f"aten.{node.op}",
            name=node.module_path,
        )

    # -- reference ----------------------------------------------------------------------------------

    def _reference(
        self, nodes: list[_Node], input_name: str, output_name: str, dtype: torch.dtype
    ) -> Callable[[Tensor], Tensor]:
        weights = {name: tensor for name, tensor in self.consts.items() if name in self.origin}

        def run(probe: Tensor) -> Tensor:
            env: dict[str, Any] = dict(weights)
            env[input_name] = probe.to(dtype)

            def resolve(value: Any) -> Any:
                if isinstance(value, _Ref):
                    return env[value.name]
                if isinstance(value, list):
                    return [resolve(v) for v in value]
                return value

            try:
                with torch.no_grad():
                    for node in nodes:
                        result = _aten(node.op)(**{k: resolve(v) for k, v in node.args.items()})
                        results = list(result) if isinstance(result, (tuple, list)) else [result]
                        for name, value in zip(node.outputs, results, strict=False):
                            if name is not None:
                                env[name] = value
            except Exception as exc:
                raise invalid(f"the exported graph fails on a probe of shape {tuple(probe.shape)}: {exc}") from None
            return env[output_name].float()

        return run


def _pair(node: _Node, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list) and len(value) in (1, 2) and all(isinstance(v, int) for v in value):
        return (value[0], value[-1])
    raise _fail_op(node, f"expected one or two integers, got {value!r}")
