"""Parameter-free modules that rebuilt models use beside real ``nn`` layers.

Every learnable weight of an imported model lives in an ``nn.Linear`` or ``nn.Conv2d``; the modules here
hold no parameters (constants are buffers), so the curvature core's walk over parameterised layers
never meets them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Reshape(nn.Module):
    """Reshape every example to ``shape``, keeping the leading batch dimension.

    Args:
        shape: Target shape of one example (without the batch dimension).
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class ConstantAffine(nn.Module):
    """``y = x * scale + shift`` with constant (buffer) ``scale`` and ``shift``.

    Used for an inference-mode batch normalisation that cannot be folded into a preceding layer, and for
    arithmetic with constants (input normalisation, ...). Both buffers broadcast against one example, so
    the batch dimension is never mixed.

    Args:
        scale: Multiplier broadcastable to one example's shape, or ``None`` for 1.
        shift: Offset broadcastable to one example's shape, or ``None`` for 0.
    """

    scale: Tensor | None
    shift: Tensor | None

    def __init__(self, scale: Tensor | None, shift: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("scale", None if scale is None else scale.detach().clone().float())
        self.register_buffer("shift", None if shift is None else shift.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is not None:
            x = x * self.scale
        if self.shift is not None:
            x = x + self.shift
        return x


class ConstantPReLU(nn.Module):
    """``x`` where ``x ≥ 0``, ``weight · x`` elsewhere, with constant (buffer) slopes: one for every entry, or one per
    channel (the example's first axis), as ``torch.nn.functional.prelu`` (a PReLU's learned slopes, kept at their
    trained values; it exports back to ONNX as ``PRelu``). Element-wise: KFRA can propagate through it.

    Args:
        weight: 1-D slopes, of size 1 or the number of channels.
    """

    elementwise = True
    weight: Tensor

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float().reshape(-1))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.prelu(x, self.weight)


class HardSigmoid(nn.Module):
    """``clamp(alpha · x + beta, 0, 1)`` (ONNX HardSigmoid with other constants than torch's 1/6 and 1/2)."""

    elementwise = True

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return (self.alpha * x + self.beta).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


class LayerNorm(nn.Module):
    """Layer normalisation over the last ``len(shape)`` dimensions of each example, with constant (buffer) scale
    and shift (a trained LayerNorm's affine parameters, kept at their trained values).

    Args:
        shape: The normalised trailing shape of one example.
        eps: Added to the variance.
        weight: Scale of that shape, or ``None`` for 1.
        bias: Shift of that shape, or ``None`` for 0.
    """

    weight: Tensor | None
    bias: Tensor | None

    def __init__(self, shape: Sequence[int], eps: float, weight: Tensor | None, bias: Tensor | None) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.eps = float(eps)
        self.register_buffer("weight", None if weight is None else weight.detach().clone().float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x, self.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, eps={self.eps}"


class GroupNorm(nn.Module):
    """Group normalisation of each example's channels (its first axis) in ``groups`` groups, with constant (buffer)
    per-channel scale and shift (a trained GroupNorm's or InstanceNorm's, kept at their trained values).

    Args:
        groups: Number of groups (the channels for instance normalisation).
        eps: Added to the variance.
        weight: Per-channel scale, or ``None`` for 1.
        bias: Per-channel shift, or ``None`` for 0.
    """

    weight: Tensor | None
    bias: Tensor | None

    def __init__(self, groups: int, eps: float, weight: Tensor | None, bias: Tensor | None) -> None:
        super().__init__()
        self.groups, self.eps = int(groups), float(eps)
        self.register_buffer("weight", None if weight is None else weight.detach().clone().float().reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float().reshape(-1))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.group_norm(x, self.groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, eps={self.eps}"


class Add(nn.Module):
    """Element-wise sum of two activations of the same shape (a residual connection)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class Concat(nn.Module):
    """Activations joined along axis ``dim`` of the batched tensors (never the batch axis 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Mean(nn.Module):
    """Mean over non-batch dimensions of each example.

    Args:
        dims: Dimensions of the full (batched) tensor to average; never 0.
        keepdim: Keep the reduced dimensions with size 1.
    """

    def __init__(self, dims: Sequence[int], keepdim: bool) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.keepdim = bool(keepdim)

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=self.dims, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, keepdim={self.keepdim}"


class GraphProgram(nn.Module):
    """Runs a fixed list of sub-modules over named activations (a DAG that is not a chain).

    Each step applies one registered sub-module to previously computed activations. Sub-modules are
    registered directly on this module, so ``named_modules()`` shows them under their own names.

    Args:
        steps: ``(module_name, module, input_names, output_name)`` in execution order.
        input_name: Name of the model input in the program.
        output_name: Name of the activation the model returns.
    """

    def __init__(
        self,
        steps: Sequence[tuple[str, nn.Module, Sequence[str], str]],
        input_name: str,
        output_name: str,
    ) -> None:
        super().__init__()
        self._program: list[tuple[str, tuple[str, ...], str]] = []
        for name, module, inputs, output in steps:
            self.add_module(name, module)
            self._program.append((name, tuple(inputs), output))
        self._input_name = input_name
        self._output_name = output_name

    @property
    def program(self) -> list[tuple[str, tuple[str, ...], str]]:
        """The steps as ``(module_name, input_names, output_name)``."""
        return list(self._program)

    def forward(self, x: Tensor) -> Tensor:
        env: dict[str, Tensor] = {self._input_name: x}
        for name, inputs, output in self._program:
            env[output] = self._modules[name](*(env[i] for i in inputs))
        return env[self._output_name]

    def extra_repr(self) -> str:
        lines = [f"{out} = {name}({', '.join(ins)})" for name, ins, out in self._program]
        return "\n".join([f"input={self._input_name}, output={self._output_name}", *lines])


def is_foldable_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer an affine map can be folded into (``nn.Linear`` / ``nn.Conv2d``)."""
    return isinstance(module, (nn.Linear, nn.Conv2d))


def with_affine_output(module: nn.Linear | nn.Conv2d, scale: Tensor | None, shift: Tensor | None) -> nn.Module:
    """A copy of ``module`` whose output is ``module(x) * scale + shift`` per output channel.

    Args:
        module: The layer to fold into.
        scale: ``(out_channels,)`` multiplier or ``None``.
        shift: ``(out_channels,)`` offset or ``None``.

    Returns:
        A new layer of the same type with folded weight and bias (a bias is added when needed).
    """
    weight = module.weight.detach().clone()
    bias = None if module.bias is None else module.bias.detach().clone()
    out = weight.shape[0]
    if scale is not None:
        weight = weight * scale.reshape(out, *([1] * (weight.dim() - 1)))
        bias = None if bias is None else bias * scale
    if shift is not None:
        bias = shift.clone() if bias is None else bias + shift
    if isinstance(module, nn.Linear):
        new: nn.Module = nn.utils.skip_init(nn.Linear, module.in_features, module.out_features, bias=bias is not None)
    else:
        new = nn.utils.skip_init(
            nn.Conv2d,
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias is not None,
            padding_mode=module.padding_mode,
        )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new
