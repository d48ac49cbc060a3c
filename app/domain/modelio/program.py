"""Assembles a rebuilt model from translated graph nodes; shared by the ONNX and torch.export importers.

Importers walk their graph in topological order and describe each node in terms of real modules
(``add``), renames (``alias``), per-example reshapes (``reshape``) and constant affine maps (``affine``).
The builder tracks the shape of every activation by running each new module on the ``meta`` device
(shapes only, no memory or compute; activations over :data:`MAX_ACTIVATION_ELEMENTS` are refused), folds affine maps (biases, inference batch norm, scalings) into a preceding
``nn.Linear`` / ``nn.Conv2d`` when that layer's output has no other use, and finally returns an
``nn.Sequential`` when the steps form a chain, else a :class:`~app.domain.modelio.modules.GraphProgram`.

Activations are named by the importer's graph names; shapes exclude the batch dimension, which every
activation carries first and which no rebuilt module mixes with other dimensions.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ModelImportError
from .modules import ConstantAffine, GraphProgram, Reshape, is_foldable_layer, with_affine_output

#: Upper bound on the elements of one example's input or of any activation computed from it.
MAX_ACTIVATION_ELEMENTS = 2**26

_RESERVED_NAMES = frozenset(dir(nn.Sequential)) | frozenset(dir(GraphProgram)) | {"program"}


@dataclass
class Translation:
    """What an importer hands back: the rebuilt module and how to check it against the original graph.

    Attributes:
        module: The rebuilt module (returns logits when a final activation was stripped).
        input_shape: Per-example input shape.
        output_activation: ``"softmax"``, ``"log_softmax"``, ``"sigmoid"`` or ``None``.
        probe_batch: Batch size the original graph accepts (its fixed batch size, if it has one).
        reference: Runs the original graph, final activation included, on a float32 batch.
        largest_activation: Elements of the largest per-example activation (input included).
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    output_activation: str | None
    probe_batch: int
    reference: Callable[[Tensor], Tensor]
    largest_activation: int


@dataclass
class _Step:
    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    output: str


def resolve_reshape(
    target: Sequence[int | None],
    in_shape: Sequence[int],
    *,
    static_batch: int | None,
    zero_copies: bool,
    op: str,
) -> tuple[int, ...]:
    """Resolve a reshape target of the full (batched) tensor to a per-example shape.

    Args:
        target: Target shape including the batch dimension; ``None`` marks the symbolic batch size.
        in_shape: Per-example input shape.
        static_batch: The graph's fixed batch size, if it was exported with one.
        zero_copies: Whether a 0 copies the input's dimension at the same index (ONNX ``allowzero=0``).
        op: Operator name for error messages.

    Returns:
        The per-example target shape.

    Raises:
        ModelImportError: If the reshape would mix the batch dimension with other dimensions.
    """
    dims = list(target)
    if not dims:
        raise ModelImportError("unsupported_graph", f"{op} to a scalar removes the batch dimension", {"op": op})
    lead = dims[0]
    if not (lead is None or lead == -1 or (lead == 0 and zero_copies) or lead == static_batch):
        raise ModelImportError(
            "unsupported_graph",
            f"{op} to {_fmt(target)} does not keep the batch dimension first",
            {"op": op, "target": _fmt(target), "input_shape": list(in_shape)},
        )
    rest: list[int] = []
    for i, d in enumerate(dims[1:], start=1):
        if d is None:
            raise ModelImportError("unsupported_graph", f"{op} moves the batch size to dimension {i}", {"op": op})
        if d == 0 and zero_copies:
            if i - 1 >= len(in_shape):
                raise ModelImportError("unsupported_graph", f"{op}: 0 refers to a missing dimension", {"op": op})
            d = in_shape[i - 1]
        if d < -1 or d == 0:
            raise ModelImportError("unsupported_graph", f"{op}: invalid target dimension {d}", {"op": op})
        rest.append(int(d))
    numel = math.prod(in_shape)
    if rest.count(-1) > 1:
        raise ModelImportError("unsupported_graph", f"{op}: more than one -1 in the target", {"op": op})
    if -1 in rest:
        known = math.prod(d for d in rest if d != -1)
        if known == 0 or numel % known:
            raise ModelImportError(
                "unsupported_graph",
                f"{op} to {_fmt(target)} does not fit an example of shape {tuple(in_shape)}",
                {"op": op},
            )
        rest[rest.index(-1)] = numel // known
    if math.prod(rest) != numel:
        raise ModelImportError(
            "unsupported_graph",
            f"{op} to {_fmt(target)} does not keep the batch dimension separate (example of shape {tuple(in_shape)})",
            {"op": op, "target": _fmt(target), "input_shape": list(in_shape)},
        )
    return tuple(rest)


def resolve_input_shape(graph_dims: Sequence[int | None] | None, caller: tuple[int, ...] | None) -> tuple[int, ...]:
    """Per-example input shape from the graph's static dims and/or the caller's shape.

    Args:
        graph_dims: The graph input's non-batch dims (``None`` where dynamic), or ``None`` if unknown.
        caller: The shape the caller passed, if any.

    Returns:
        The per-example input shape.

    Raises:
        ModelImportError: ``bad_input_shape`` if the shape is missing, malformed or contradicts the graph.
    """
    if caller is not None:
        if not caller or any(not isinstance(d, int) or d <= 0 for d in caller):
            raise ModelImportError("bad_input_shape", f"input_shape {caller} must be positive integers")
        if graph_dims is not None and (
            len(graph_dims) != len(caller)
            or any(g is not None and g != c for g, c in zip(graph_dims, caller, strict=True))
        ):
            raise ModelImportError(
                "bad_input_shape",
                f"input_shape {tuple(caller)} contradicts the graph's input "
                f"(batch, {', '.join('?' if d is None else str(d) for d in graph_dims)})",
                {"input_shape": list(caller), "graph": ["?" if d is None else d for d in graph_dims]},
            )
        return _bounded(tuple(caller))
    if graph_dims is None or any(d is None for d in graph_dims):
        raise ModelImportError(
            "bad_input_shape",
            "the graph does not fix the per-example input shape; pass input_shape",
            {"graph": None if graph_dims is None else ["?" if d is None else d for d in graph_dims]},
        )
    return _bounded(tuple(int(d) for d in graph_dims))  # type: ignore[arg-type]


def split_batch_dim(dims: Sequence[int | None]) -> tuple[int | None, list[int | None]]:
    """Splits a graph input's dims into its fixed batch size (``None`` if dynamic) and per-example dims.

    Raises:
        ModelImportError: ``unsupported_graph`` if there is no feature dimension besides the batch.
    """
    if len(dims) < 2:
        raise ModelImportError(
            "unsupported_graph",
            "the model input must have a batch dimension and at least one feature dimension",
            {"input_rank": len(dims)},
        )
    return dims[0], list(dims[1:])


def _bounded(shape: tuple[int, ...]) -> tuple[int, ...]:
    if math.prod(shape) > MAX_ACTIVATION_ELEMENTS:
        raise ModelImportError(
            "too_large",
            f"an input example of shape {shape} exceeds {MAX_ACTIVATION_ELEMENTS} values",
            {"input_shape": list(shape), "max_elements": MAX_ACTIVATION_ELEMENTS},
        )
    return shape


def _fmt(target: Sequence[int | None]) -> list[int | str]:
    return ["batch" if d is None else int(d) for d in target]


def _per_channel(t: Tensor | None, shape: Sequence[int], axis: int) -> Tensor | None:
    """``t`` as a ``(shape[axis],)`` vector if it only varies along ``axis`` of an example, else ``None``."""
    if t is None:
        return None
    if t.dim() > len(shape):
        return None
    aligned = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
    if any(s != 1 for d, s in enumerate(aligned.shape) if d != axis):
        return None
    vec = aligned.reshape(-1)
    channels = shape[axis]
    if vec.numel() == 1:
        return vec.expand(channels).clone()
    return vec.clone() if vec.numel() == channels else None


class ProgramBuilder:
    """Collects translated nodes and assembles the rebuilt ``nn.Module``.

    Args:
        input_name: Graph name of the model input.
        input_shape: Per-example input shape.
        use_counts: For every graph activation name, how many node inputs (plus graph outputs) use it.
    """

    def __init__(self, input_name: str, input_shape: Sequence[int], use_counts: Mapping[str, int]) -> None:
        self._input = input_name
        self._shapes: dict[str, tuple[int, ...]] = {input_name: tuple(int(d) for d in input_shape)}
        self._canonical: dict[str, str] = {input_name: input_name}
        self._use_counts = dict(use_counts)
        self._uses: dict[str, int] = {input_name: self._use_counts.get(input_name, 0)}
        self._steps: list[_Step] = []
        self._producer: dict[str, int] = {}
        self._names: set[str] = set()
        self.largest_activation = math.prod(self._shapes[input_name])

    def is_activation(self, name: str) -> bool:
        """Whether ``name`` is a (batched) activation known to the builder."""
        return name in self._canonical

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-example shape of activation ``name``."""
        return self._shapes[self._canonical[name]]

    def canonical(self, name: str) -> str:
        """The activation that ``name`` is an alias of (itself when it is not an alias)."""
        return self._canonical[name]

    def producer(self, name: str) -> tuple[nn.Module, tuple[str, ...]] | None:
        """The module computing activation ``name`` and its (canonical) inputs; ``None`` for the input."""
        index = self._producer.get(self._canonical[name])
        if index is None:
            return None
        return self._steps[index].module, self._steps[index].inputs

    def graph_uses(self, name: str) -> int:
        """How many graph nodes (and graph outputs) read the graph value ``name`` itself."""
        return self._use_counts.get(name, 0)

    def uses(self, name: str) -> int:
        """How many graph nodes (and graph outputs) read activation ``name`` under any of its aliases."""
        return self._uses[self._canonical[name]]

    def replace_producer(self, name: str, module: nn.Module) -> None:
        """Swap the module that computes activation ``name`` for an equivalent-shaped one."""
        index = self._producer[self._canonical[name]]
        self._steps[index].module = module

    def add(
        self,
        module: nn.Module,
        inputs: Sequence[str],
        output: str,
        *,
        kind: str,
        name: str | None = None,
        op: str,
    ) -> tuple[int, ...]:
        """Append a step computing ``output = module(*inputs)``.

        Args:
            module: The module (real ``nn`` layer or a parameter-free helper).
            inputs: Activation names it reads.
            output: Activation name it writes.
            kind: Short kind used to name the step when ``name`` is not given (``"relu"``, ...).
            name: Preferred step name (e.g. the original layer name); sanitised and made unique.
            op: Operator description for error messages.

        Returns:
            The per-example shape of ``output``.
        """
        canon = [self._canonical[i] for i in inputs]
        probes = tuple(torch.empty((1, *self._shapes[c]), device="meta") for c in canon)
        state = {k: v.to("meta") for k, v in (*module.named_parameters(), *module.named_buffers())}
        try:
            with torch.no_grad():
                result = torch.func.functional_call(module, state, probes)
        except Exception as exc:  # the module cannot run on the graph's shapes
            raise ModelImportError(
                "unsupported_graph",
                f"{op} cannot be rebuilt for input shape(s) {[list(self._shapes[c]) for c in canon]}: {exc}",
                {"op": op},
            ) from None
        if not isinstance(result, Tensor) or result.dim() < 1 or result.shape[0] != 1:
            raise ModelImportError("unsupported_graph", f"{op} does not keep the batch dimension", {"op": op})
        size = math.prod(result.shape[1:])
        if size > MAX_ACTIVATION_ELEMENTS:
            raise ModelImportError(
                "too_large",
                f"{op} produces {size} values per example, over the limit of {MAX_ACTIVATION_ELEMENTS}",
                {"op": op, "elements": size, "max_elements": MAX_ACTIVATION_ELEMENTS},
            )
        self.largest_activation = max(self.largest_activation, size)
        step_name = self._unique_name(name or kind)
        self._steps.append(_Step(step_name, module, tuple(canon), output))
        self._producer[output] = len(self._steps) - 1
        self._canonical[output] = output
        self._shapes[output] = tuple(result.shape[1:])
        self._uses[output] = self._use_counts.get(output, 0)
        return self._shapes[output]

    def alias(self, src: str, dst: str) -> None:
        """Make ``dst`` another name for activation ``src`` (Identity, inference Dropout, no-op reshapes)."""
        canon = self._canonical[src]
        self._canonical[dst] = canon
        self._uses[canon] += self._use_counts.get(dst, 0) - 1

    def reshape(self, src: str, dst: str, shape: Sequence[int], *, op: str, name: str | None = None) -> None:
        """Per-example reshape of ``src`` to ``shape``: an alias, ``nn.Flatten`` or :class:`Reshape`."""
        shape = tuple(int(d) for d in shape)
        current = self.shape(src)
        if math.prod(shape) != math.prod(current):
            raise ModelImportError("unsupported_graph", f"{op}: cannot reshape {current} to {shape}", {"op": op})
        if shape == current:
            self.alias(src, dst)
        elif len(shape) == 1:
            self.add(nn.Flatten(), [src], dst, kind="flatten", name=name, op=op)
        else:
            self.add(Reshape(shape), [src], dst, kind="reshape", name=name, op=op)

    def affine(
        self,
        src: str,
        dst: str,
        scale: Tensor | None,
        shift: Tensor | None,
        *,
        op: str,
        name: str | None = None,
    ) -> None:
        """``dst = src * scale + shift`` with constants broadcast against one example of ``src``.

        Folded into the producing ``nn.Linear`` / ``nn.Conv2d`` when the constants are per output channel
        and ``src`` has no other use; otherwise a parameter-free :class:`ConstantAffine` step.
        """
        shape = self.shape(src)
        for t in (scale, shift):
            if t is None:
                continue
            if t.dim() > len(shape):
                raise ModelImportError(
                    "unsupported_graph",
                    f"{op}: a constant of shape {tuple(t.shape)} would broadcast over the batch dimension",
                    {"op": op},
                )
            try:
                broadcast = torch.broadcast_shapes(tuple(t.shape), shape)
            except RuntimeError:
                broadcast = None
            if broadcast != shape:
                raise ModelImportError(
                    "unsupported_graph",
                    f"{op}: a constant of shape {tuple(t.shape)} does not broadcast to {shape}",
                    {"op": op},
                )
        canon = self._canonical[src]
        index = self._producer.get(canon)
        if index is not None and self._uses[canon] == 1 and is_foldable_layer(self._steps[index].module):
            layer = self._steps[index].module
            axis = len(shape) - 1 if isinstance(layer, nn.Linear) else 0
            vec_scale, vec_shift = _per_channel(scale, shape, axis), _per_channel(shift, shape, axis)
            if (scale is None or vec_scale is not None) and (shift is None or vec_shift is not None):
                self._steps[index].module = with_affine_output(layer, vec_scale, vec_shift)
                self.alias(src, dst)
                return
        self.add(ConstantAffine(scale, shift), [src], dst, kind="affine", name=name, op=op)

    def build(self, output: str) -> nn.Module:
        """Assemble the module computing activation ``output`` from the input.

        Returns:
            ``nn.Sequential`` for a chain of steps, else a :class:`GraphProgram`.

        Raises:
            ModelImportError: If the output does not depend on any ``nn.Linear`` / ``nn.Conv2d``.
        """
        if output not in self._canonical:
            raise ModelImportError("unsupported_graph", "the model output is not computed from its input")
        target = self._canonical[output]
        needed: set[str] = {target}
        used: list[_Step] = []
        for step in reversed(self._steps):
            if step.output in needed:
                used.append(step)
                needed.update(step.inputs)
        used.reverse()
        if not any(is_foldable_layer(s.module) for s in used):
            raise ModelImportError(
                "unsupported_graph",
                "the model has no nn.Linear / nn.Conv2d layer on the path from input to output",
            )
        previous = self._input
        chain = True
        for step in used:
            if step.inputs != (previous,):
                chain = False
                break
            previous = step.output
        if chain and previous == target:
            return nn.Sequential(OrderedDict((s.name, s.module) for s in used))
        return GraphProgram([(s.name, s.module, s.inputs, s.output) for s in used], self._input, target)

    def _unique_name(self, hint: str) -> str:
        base = re.sub(r"[^0-9A-Za-z_]", "_", hint).strip("_") or "layer"
        if base in _RESERVED_NAMES:
            base = f"layer_{base}"
        name, k = base, 1
        while name in self._names:
            name = f"{base}_{k}"
            k += 1
        self._names.add(name)
        return name


def finish_translation(
    builder: ProgramBuilder,
    logits_name: str,
    input_shape: tuple[int, ...],
    activation: str | None,
    probe_batch: int,
    reference: Callable[[Tensor], Tensor],
) -> Translation:
    """Checks that the output depends on the input with shape (batch, k), then builds the module.

    Raises:
        ModelImportError: ``unsupported_graph`` otherwise.
    """
    if not builder.is_activation(logits_name):
        raise ModelImportError("unsupported_graph", "the model output does not depend on its input")
    out_shape = builder.shape(logits_name)
    if len(out_shape) != 1:
        raise ModelImportError(
            "unsupported_graph",
            f"the model output must have shape (batch, k); found (batch, {', '.join(map(str, out_shape))})",
            {"output_shape": list(out_shape)},
        )
    return Translation(
        module=builder.build(logits_name),
        input_shape=input_shape,
        output_activation=activation,
        probe_batch=probe_batch,
        largest_activation=builder.largest_activation,
        reference=reference,
    )
