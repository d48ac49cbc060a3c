"""Operator semantics shared by the ONNX and torch.export importers.

Each importer parses its own format (ONNX nodes and attributes, serialised aten calls and arguments) and maps
its operator names onto the vocabulary here; what an operator *means* as real ``nn`` modules is written once:

- activations (:data:`ACTIVATIONS`, :func:`activation_module`, :func:`clamp_module`) and the final activations
  an importer strips (:data:`OUTPUT_ACTIVATIONS`);
- element-wise arithmetic (:data:`ARITHMETIC`, :func:`add_arithmetic`): with a constant it is an affine map
  ``y = x * scale + shift`` folded into the preceding layer where possible; of two activations it is a residual
  sum, ``x * sigmoid(x)`` (SiLU, which both torch ONNX exporters emit as ``Mul(x, Sigmoid(x))``) or
  ``x * tanh(softplus(x))`` (Mish, as exporters without a Mish operator write it);
- inference batch normalisation as an affine map (:func:`add_batch_norm`);
- layers: :func:`linear_layer`, :func:`add_conv2d` (asymmetric padding becomes an ``nn.ZeroPad2d`` in front,
  and the convolution must pass the curvature core's own check, so grouped convolutions are refused at upload),
  the SAME padding rule (:func:`same_pads`) and means over example dimensions (:func:`example_dims`).

Refusals are raised as :class:`OpRefused` (a reason without node context); each importer turns them into a
:class:`~app.domain.modelio.errors.ModelImportError` naming its node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvature.layers import Conv2dHandler

from .modules import Add, Concat, ConstantPReLU, GroupNorm, HardSigmoid, LayerNorm
from .program import ProgramBuilder


class OpRefused(Exception):
    """An operator (or its settings) that the importers cannot rebuild as fittable modules.

    Attributes:
        reason: What is wrong, without the node's name (the importer adds it).
        code: The :data:`~app.domain.modelio.errors.ERROR_CODES` entry to report.
        detail: Extra JSON-serialisable context.
    """

    def __init__(self, reason: str, code: str = "unsupported_op", **detail: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.detail = detail


# -- activations ------------------------------------------------------------------------------------------


def clamp_module(low: float, high: float) -> nn.Module:
    """``clamp(x, low, high)`` as ``nn.ReLU``, ``nn.ReLU6`` or ``nn.Hardtanh``."""
    low, high = float(low), float(high)
    if low == 0.0 and high == math.inf:
        return nn.ReLU()
    if low == 0.0 and high == 6.0:
        return nn.ReLU6()
    if low < high:
        return nn.Hardtanh(low, high)
    raise OpRefused(f"empty clip range [{low}, {high}]")


#: torch's SELU constants (``nn.SELU``); ONNX stores them rounded to float32.
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _selu(alpha: float = SELU_ALPHA, gamma: float = SELU_SCALE) -> nn.Module:
    if not (
        math.isclose(float(alpha), SELU_ALPHA, rel_tol=1e-6) and math.isclose(float(gamma), SELU_SCALE, rel_tol=1e-6)
    ):
        raise OpRefused(f"only SELU with the standard constants is supported (alpha={alpha}, gamma={gamma})")
    return nn.SELU()


def _elu(alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> nn.Module:
    if float(input_scale) == 1.0 and float(scale) != 1.0:  # how core aten writes SELU
        return _selu(alpha, scale)
    if float(scale) != 1.0 or float(input_scale) != 1.0:
        raise OpRefused("only ELU with scale=1 and input_scale=1 (or SELU's constants) is supported")
    return nn.ELU(float(alpha))


def _gelu(approximate: str = "none") -> nn.Module:
    if approximate not in ("none", "tanh"):
        raise OpRefused(f"approximate={approximate!r} is not supported")
    return nn.GELU(approximate=approximate)


def _hardsigmoid(alpha: float = 1.0 / 6.0, beta: float = 0.5) -> nn.Module:
    alpha, beta = float(alpha), float(beta)
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise OpRefused(f"HardSigmoid constants must be finite (alpha={alpha}, beta={beta})")
    if math.isclose(alpha, 1.0 / 6.0, rel_tol=1e-6) and math.isclose(beta, 0.5, rel_tol=1e-6):
        return nn.Hardsigmoid()
    return HardSigmoid(alpha, beta)


#: Element-wise activations by kind, each a factory of its ``nn`` module taking the activation's parameters.
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardtanh": lambda min_val=-1.0, max_val=1.0: clamp_module(min_val, max_val),
    "leaky_relu": lambda negative_slope=0.01: nn.LeakyReLU(float(negative_slope)),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": _elu,
    "softplus": lambda beta=1.0, threshold=20.0: nn.Softplus(float(beta), float(threshold)),
    "gelu": _gelu,
    "selu": _selu,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "hardsigmoid": _hardsigmoid,
}

#: Final activations an importer strips from the graph and reports (see ``apply_output_activation``).
OUTPUT_ACTIVATIONS = frozenset({"softmax", "log_softmax", "sigmoid"})


def activation_module(kind: str, **params: Any) -> nn.Module:
    """The module of activation ``kind`` (a key of :data:`ACTIVATIONS`) with its parameters."""
    return ACTIVATIONS[kind](**params)


def prelu_module(slope: Tensor, example_shape: Sequence[int], *, channel_first: bool) -> nn.Module:
    """A PReLU with constant slopes for examples of ``example_shape``: one slope, or one per channel (the
    example's first axis).

    ``channel_first``: ``slope`` is 1-D, one value or one per channel (torch's ``prelu``); otherwise it broadcasts
    numpy-style against the batched input (ONNX ``PRelu``) and must be constant over every axis but the channel's.
    """
    slope = slope.detach().float()
    if not bool(torch.isfinite(slope).all()):
        raise OpRefused("PReLU slopes must be finite")
    example = tuple(int(d) for d in example_shape)
    shape = tuple(slope.shape)
    if slope.numel() == 1:
        return ConstantPReLU(slope.reshape(1))
    if channel_first:
        per_channel = slope.dim() == 1 and bool(example) and shape[0] == example[0]
    else:
        if len(shape) == len(example) + 1:
            if shape[0] != 1:
                raise OpRefused("a PReLU slope may not vary over the batch")
            shape = shape[1:]
        padded = (1,) * (len(example) - len(shape)) + shape
        per_channel = (
            len(shape) <= len(example) and bool(example) and padded[0] == example[0] and all(d == 1 for d in padded[1:])
        )
    if not per_channel:
        raise OpRefused(
            f"PReLU slopes of shape {tuple(slope.shape)} for inputs {list(example)}: only one slope or one per "
            "channel (the first axis of an example) is supported"
        )
    return ConstantPReLU(slope.reshape(-1))


def layer_norm_module(
    example_shape: Sequence[int], axis: int, eps: float, weight: Tensor | None, bias: Tensor | None
) -> nn.Module:
    """Layer normalisation of each example over its axes from ``axis`` on (an axis of the *batched* input,
    negative from the end; the batch axis may not be normalised), with constant scale and shift."""
    example = tuple(int(d) for d in example_shape)
    rank = len(example) + 1
    first = axis + rank if axis < 0 else axis
    if not 1 <= first < rank:
        raise OpRefused(f"layer normalisation must act within each example (axis {axis} of a rank-{rank} input)")
    shape = example[first - 1 :]
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise OpRefused(f"epsilon must be finite and non-negative, got {eps}")

    def full(value: Tensor | None, what: str) -> Tensor | None:
        if value is None:
            return None
        value = value.detach().float()
        try:
            if torch.broadcast_shapes(tuple(value.shape), shape) != shape:
                raise RuntimeError
        except RuntimeError:
            raise OpRefused(f"layer-norm {what} of shape {tuple(value.shape)} does not fit {list(shape)}") from None
        if not bool(torch.isfinite(value).all()):
            raise OpRefused(f"layer-norm {what} must be finite")
        return value.expand(shape).clone()

    return LayerNorm(shape, eps, full(weight, "scale"), full(bias, "bias"))


def group_norm_module(
    example_shape: Sequence[int], groups: int | None, eps: float, weight: Tensor | None, bias: Tensor | None
) -> nn.Module:
    """Group normalisation of examples of ``example_shape``, whose first axis holds the channels, with constant
    per-channel scale and shift; ``groups=None``: one group per channel (instance normalisation)."""
    example = tuple(int(d) for d in example_shape)
    if len(example) < 2:
        raise OpRefused(f"group normalisation needs channels and at least one more axis, got examples {list(example)}")
    channels, eps = example[0], float(eps)
    groups = channels if groups is None else int(groups)
    if groups < 1 or channels % groups:
        raise OpRefused(f"{channels} channels do not split into {groups} groups")
    if not (math.isfinite(eps) and eps >= 0):
        raise OpRefused(f"epsilon must be finite and non-negative, got {eps}")
    for what, value in (("scale", weight), ("bias", bias)):
        if value is not None and (value.numel() != channels or not bool(torch.isfinite(value).all())):
            raise OpRefused(f"group-norm {what} must hold {channels} finite values, got shape {tuple(value.shape)}")
    return GroupNorm(groups, eps, weight, bias)


def check_class_axis(axis: int, op: str) -> None:
    """A stripped final softmax must normalise over the classes, the last axis of a ``(batch, k)`` output."""
    if axis not in (1, -1):
        raise OpRefused(f"the final {op} must act on the class axis", axis=axis)


# -- arithmetic -------------------------------------------------------------------------------------------

#: Element-wise binary operators: ``first (op) alpha * second`` for add / sub, ``first (op) second`` else.
ARITHMETIC = ("add", "sub", "mul", "div")

#: An operand: the name of an activation in the builder, or a constant tensor.
Operand = str | Tensor


def add_arithmetic(
    builder: ProgramBuilder,
    kind: str,
    first: Operand,
    second: Operand,
    output: str,
    *,
    alpha: float = 1.0,
    op: str,
    name: str | None = None,
) -> None:
    """Rebuild ``output = first (kind) second`` (``kind`` in :data:`ARITHMETIC`).

    With one constant operand ``c`` it is an affine map of the activation ``x``: ``x + alpha c``,
    ``c + alpha x``, ``x - alpha c``, ``c - alpha x``, ``x c``, ``x / c`` (``c / x`` is refused). A constant
    with a leading batch dimension of 1 loses it; one that would broadcast over the batch is refused by the
    builder. With two activations it is either their sum (a residual connection, same shapes, ``alpha = 1``)
    or ``x * sigmoid(x)``, which replaces the sigmoid by ``nn.SiLU``, or ``x * tanh(softplus(x))``, which becomes
    ``nn.Mish``.

    Args:
        builder: The program being built.
        kind: ``"add"``, ``"sub"``, ``"mul"`` or ``"div"``.
        first: Left operand.
        second: Right operand.
        output: Activation name of the result.
        alpha: Multiplier of ``second`` for add / sub.
        op: Operator description for messages.
        name: Preferred step name.
    """
    if kind not in ARITHMETIC:
        raise ValueError(f"unknown arithmetic {kind!r}")
    if isinstance(first, str):
        if isinstance(second, str):
            _two_activations(builder, kind, first, second, output, alpha=alpha, op=op)
            return
        x, c, const_first = first, second, False
    elif isinstance(second, str):
        x, c, const_first = second, first, True
    else:
        raise OpRefused("arithmetic needs an activation operand")
    shape = builder.shape(x)
    c = c.float()
    if c.dim() == len(shape) + 1:
        if c.shape[0] != 1:
            raise OpRefused("a constant with a batch dimension is not supported")
        c = c[0]
    alpha = float(alpha)
    scale: Tensor | None
    shift: Tensor | None
    if kind in ("add", "sub"):
        sign = 1.0 if kind == "add" else -1.0
        if const_first:
            scale = None if sign * alpha == 1.0 else torch.tensor(sign * alpha)
            shift = c
        else:
            scale, shift = None, sign * alpha * c
    elif kind == "mul":
        scale, shift = c, None
    elif const_first:
        raise OpRefused("dividing a constant by an activation is not supported")
    else:
        scale, shift = 1.0 / c, None
    builder.affine(x, output, scale, shift, op=op, name=name)


def _two_activations(builder: ProgramBuilder, kind: str, a: str, b: str, output: str, *, alpha: float, op: str) -> None:
    if kind == "add" and float(alpha) == 1.0:
        if builder.shape(a) != builder.shape(b):
            raise OpRefused(f"shapes {builder.shape(a)} and {builder.shape(b)} differ")
        builder.add(Add(), [a, b], output, kind="add", op=op)
        return
    if kind == "mul":
        for gate, x in ((a, b), (b, a)):
            produced = builder.producer(gate)
            if (
                produced is not None
                and type(produced[0]) is nn.Sigmoid
                and produced[1] == (builder.canonical(x),)
                and builder.uses(gate) == 1
            ):
                builder.replace_producer(gate, nn.SiLU())
                builder.alias(gate, output)
                return
            if produced is not None and type(produced[0]) is nn.Tanh and builder.uses(gate) == 1:
                (inner,) = produced[1]
                below = builder.producer(inner)
                if (
                    below is not None
                    and type(below[0]) is nn.Softplus
                    and below[0].beta == 1.0
                    and below[1] == (builder.canonical(x),)
                    and builder.uses(inner) == 1
                ):  # x * tanh(softplus(x)): Mish, as opset-17 exporters write it
                    builder.replace_producer(inner, nn.Mish())
                    builder.replace_producer(gate, nn.Identity())
                    builder.alias(gate, output)
                    return
    raise OpRefused(
        "of two activations only their sum (a residual connection), x * sigmoid(x) (SiLU) and x * tanh(softplus(x)) "
        "(Mish) are supported"
    )


def add_concat(
    builder: ProgramBuilder, inputs: Sequence[str], output: str, axis: int, *, op: str, name: str | None = None
) -> None:
    """``output = concat(inputs)`` along ``axis`` of the batched tensors (negative from the end; never the batch
    axis), every input an activation of the same shape off that axis."""
    shapes = [builder.shape(i) for i in inputs]
    rank = len(shapes[0]) + 1
    dim = axis + rank if axis < 0 else axis
    if not 1 <= dim < rank:
        raise OpRefused(f"concatenation must join axes within each example (axis {axis} of rank-{rank} inputs)")
    if any(
        len(s) != len(shapes[0]) or s[: dim - 1] + s[dim:] != shapes[0][: dim - 1] + shapes[0][dim:] for s in shapes
    ):
        raise OpRefused(f"shapes {[list(s) for s in shapes]} differ off the concatenation axis {dim}")
    builder.add(Concat(dim), list(inputs), output, kind="concat", name=name, op=op)


# -- normalisation ----------------------------------------------------------------------------------------


def add_batch_norm(
    builder: ProgramBuilder,
    x: str,
    output: str,
    *,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    op: str,
    name: str | None = None,
) -> None:
    """Inference batch normalisation over channel axis 1 as an affine map (folded when possible).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, i.e. ``scale = weight / sqrt(var + eps)`` and
    ``shift = bias - mean * scale`` per channel, computed in float64.
    """
    scale = 1.0 / torch.sqrt(var.double() + float(eps))
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    view = (-1,) + (1,) * (len(builder.shape(x)) - 1)
    builder.affine(x, output, scale.float().reshape(view), shift.float().reshape(view), op=op, name=name)


# -- layers -----------------------------------------------------------------------------------------------


def linear_layer(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """``nn.Linear`` with ``weight`` (out, in) and a bias per output feature (or a scalar broadcast to it)."""
    if weight.dim() != 2:
        raise OpRefused("the weight must be 2-D")
    out_features, in_features = weight.shape
    if bias is not None and (
        bias.dim() > 2 or bias.numel() not in (1, out_features) or (bias.dim() == 2 and bias.shape[0] != 1)
    ):
        raise OpRefused(f"bias of shape {tuple(bias.shape)} is not per output feature")
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        if bias is not None:
            layer.bias.copy_(bias.float().reshape(-1).expand(out_features))
    return layer


def same_pads(
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    *,
    upper: bool = True,
) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` padding that makes the output size ``ceil(size / stride)``.

    The total padding per axis is ``(ceil(size / s) - 1) s + (k - 1) d + 1 - size``; an odd total puts the
    extra pixel at the end (``upper``: ONNX ``SAME_UPPER`` and torch's ``padding="same"``) or at the start.
    """
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if upper else total - small)
        end.append(total - begin[-1])
    return (begin[0], begin[1], end[0], end[1])


def add_conv2d(
    builder: ProgramBuilder,
    x: str,
    output: str,
    weight: Tensor,
    bias: Tensor | None,
    *,
    stride: Sequence[int],
    pads: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    op: str,
    name: str | None = None,
) -> None:
    """A 2-D convolution with ``pads`` = ``(top, left, bottom, right)`` zero padding.

    Symmetric padding stays in the ``nn.Conv2d``; asymmetric padding becomes an ``nn.ZeroPad2d`` in front of an
    unpadded one (the core fits the convolution on the padded input). The layer must pass the curvature core's
    own check (:meth:`curvature.layers.Conv2dHandler.check`), so what the core cannot fit, such as a grouped or
    depthwise convolution, is refused here with ``unsupported_layer`` rather than failing a fit later.
    """
    top, left, bottom, right = (int(p) for p in pads)
    if min(top, left, bottom, right) < 0:
        raise OpRefused(f"negative padding {list(pads)} is not supported")
    symmetric = (top, left) == (bottom, right)
    layer = nn.utils.skip_init(
        nn.Conv2d,
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=tuple(int(s) for s in stride),
        padding=(top, left) if symmetric else (0, 0),
        dilation=tuple(int(d) for d in dilation),
        groups=groups,
        bias=bias is not None,
    )
    try:
        Conv2dHandler.check(layer)
    except ValueError as exc:
        what = f"a grouped convolution (groups={groups})" if groups != 1 else "this convolution"
        raise OpRefused(
            f"{what} cannot be fitted by the curvature core: {exc}", code="unsupported_layer", groups=groups
        ) from None
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        if bias is not None:
            layer.bias.copy_(bias.float().reshape(-1))
    src = x
    if not symmetric:
        src = f"{output}::pad"
        builder.add(nn.ZeroPad2d((left, right, top, bottom)), [x], src, kind="pad", op=op)
    builder.add(layer, [src], output, kind="conv", name=name, op=op)


def example_dims(axes: Sequence[int], rank: int) -> list[int]:
    """Sorted, non-negative axes of a batched tensor of ``rank`` dims; refused if empty or the batch axis."""
    dims = sorted({int(a) % rank for a in axes})
    if not dims or 0 in dims:
        raise OpRefused("reducing over the batch dimension is not supported")
    return dims
