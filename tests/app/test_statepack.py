"""Checkpoint packing: nested state round-trips bit for bit, without pickle; foreign bytes are refused."""

from __future__ import annotations

import math

import pytest
import torch

from app.domain.statepack import pack_state, unpack_state
from curvature.options import Curvature


def test_nested_state_round_trips_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(3)
    state = {
        "config": {"curvature": Curvature.kfra, "tau": 1.5, "steps": 7, "momentum": True, "batch": None},
        "rho": math.nan,
        "factors": {"0": {"A": torch.randn(3, 3, dtype=torch.float64), "G": torch.randn(2, 2)}, "1": None},
        "history": [torch.arange(4), 2.0, "x"],
        "generator": g.get_state(),
    }
    back = unpack_state(pack_state(state))
    assert back["config"] == {"curvature": "kfra", "tau": 1.5, "steps": 7, "momentum": True, "batch": None}
    assert math.isnan(back["rho"])
    assert torch.equal(back["factors"]["0"]["A"], state["factors"]["0"]["A"])
    assert back["factors"]["0"]["A"].dtype == torch.float64 and back["factors"]["1"] is None
    assert torch.equal(back["history"][0], torch.arange(4)) and back["history"][1:] == [2.0, "x"]
    restored = torch.Generator()
    restored.set_state(back["generator"])
    assert torch.equal(torch.rand(5, generator=restored), torch.rand(5, generator=g))


def test_refuses_what_it_cannot_pack_or_read() -> None:
    with pytest.raises(TypeError):
        pack_state({"f": object()})
    with pytest.raises(TypeError):
        pack_state({1: torch.zeros(1)})
    with pytest.raises(ValueError):
        unpack_state(b"\x80\x04not a checkpoint")
    from safetensors.torch import save

    with pytest.raises(ValueError):
        unpack_state(save({"a": torch.zeros(1)}))
