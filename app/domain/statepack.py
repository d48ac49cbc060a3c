"""Nested training state as safetensors bytes: tensors in the body, everything else as JSON in the header.

Job checkpoints hold an optimiser's or a continual learner's ``state_dict`` (nested dicts and lists of
tensors, numbers, strings, ``None``). :func:`pack_state` writes it without pickle; :func:`unpack_state` reads
it back bit for bit. A tensor's place in the tree is kept as ``{"__tensor__": key}`` in the JSON skeleton.
"""

from __future__ import annotations

import json
import math
from enum import Enum
from typing import Any

import torch
from safetensors.torch import load, save

_SKELETON = "kronlap.state"
_TENSOR = "__tensor__"
_FLOAT = "__float__"


def pack_state(state: Any) -> bytes:
    """Serialises a tree of dicts / lists / tuples of tensors and JSON scalars (enums become their values).

    Raises:
        TypeError: A leaf that is neither a tensor nor a JSON scalar.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = node.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(node, Enum):
            return node.value
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise TypeError("state dicts must have string keys")
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v) for v in node]
        if isinstance(node, float) and not math.isfinite(node):
            return {_FLOAT: repr(node)}
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(f"cannot pack a {type(node).__name__} into a checkpoint")

    skeleton = walk(state)
    return save(tensors, metadata={_SKELETON: json.dumps(skeleton, allow_nan=False)})


def unpack_state(blob: bytes) -> Any:
    """Reads what :func:`pack_state` wrote (tuples come back as lists).

    Raises:
        ValueError: The bytes are not a packed state.
    """
    import safetensors

    try:
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
        skeleton = json.loads(metadata[_SKELETON])
    except (KeyError, ValueError, json.JSONDecodeError, safetensors.SafetensorError) as exc:
        raise ValueError(f"not a packed training state: {exc}") from exc

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {_TENSOR}:
                return tensors[node[_TENSOR]]
            if set(node) == {_FLOAT}:
                return float(node[_FLOAT])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)
