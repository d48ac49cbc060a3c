"""Registry from layer type to handler, and discovery of the layers of any ``nn.Module``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .base import LayerHandler
from .conv2d import Conv2dHandler
from .linear import LinearHandler

_HANDLERS: dict[type[nn.Module], LayerHandler] = {
    nn.Linear: LinearHandler(),
    nn.Conv2d: Conv2dHandler(),
}


def register_handler(module_type: type[nn.Module], handler: LayerHandler) -> None:
    """Teach the core a new layer type."""
    _HANDLERS[module_type] = handler


def handler_for(module: nn.Module) -> LayerHandler:
    """The handler of ``module``'s exact type; a clear error for anything unknown."""
    handler = _HANDLERS.get(type(module))
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise ValueError(f"No curvature handler for layer type {type(module).__name__}; supported: {known}.")
    return handler


@dataclass(frozen=True)
class Layer:
    """A parameterised layer found in a model."""

    name: str
    module: nn.Module
    handler: LayerHandler

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in+1): the shape of ``Ŵ``."""
        return self.handler.matrix_shape(self.module)


def find_layers(model: nn.Module, exclude: Iterable[str] = (), include: Iterable[str] | None = None) -> list[Layer]:
    """All layers with trainable parameters, in forward-definition order.

    Args:
        model: any module (not only ``nn.Sequential``).
        exclude: names of modules (as in ``named_modules``) to leave out, with everything below them.
        include: if given, only these module names are used.

    Raises:
        ValueError: a module of an unknown type owns trainable parameters and is not excluded, or a known
            layer has only some of its parameters trainable.
    """
    exclude = tuple(exclude)
    include = None if include is None else set(include)
    layers: list[Layer] = []
    for name, module in model.named_modules():
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if include is not None and name not in include:
            continue
        if type(module) not in _HANDLERS:
            raise ValueError(
                f"Module {name!r} of type {type(module).__name__} has trainable parameters but no curvature "
                f"handler; freeze its parameters or pass exclude=[{name!r}]."
            )
        if len(own) != len(list(module.parameters(recurse=False))):
            raise ValueError(f"Layer {name!r} has a mix of frozen and trainable parameters; freeze all or none.")
        layers.append(Layer(name, module, handler_for(module)))
    if include is not None:
        missing = include - {layer.name for layer in layers}
        if missing:
            raise ValueError(f"Requested layers not found or not trainable: {sorted(missing)}.")
    if not layers:
        raise ValueError("The model has no trainable Linear or Conv2d layers.")
    return layers
