"""Layer handlers and layer discovery: patch extraction, ``Ŵ = [W b]`` layout, batched forwards, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvature as cv
from curvature.layers import Conv2dHandler, LinearHandler, registry, unfold_reference

from .cases import BRANCHY, DTYPE, MLP_TANH, assert_close_report

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CONV_CONFIGS = [
    # (c_in, c_out, kernel, stride, padding, dilation, bias, height, width)
    (2, 3, 3, 1, 0, 1, True, 5, 5),
    (2, 3, 3, 1, 1, 1, True, 4, 4),
    (1, 2, (2, 3), (2, 1), (1, 0), 1, True, 5, 6),
    (3, 2, 2, 2, 0, 1, False, 6, 6),
    (2, 2, 3, 1, 2, 2, True, 5, 4),
    (2, 4, (3, 1), (1, 2), (0, 1), (2, 1), False, 7, 5),
]


def _conv(cfg, seed=0) -> nn.Conv2d:
    c_in, c_out, k, s, p, d, bias, _, _ = cfg
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias).to(DTYPE)


def _input(cfg, n=3, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg[0], cfg[7], cfg[8], generator=gen, dtype=DTYPE)


# ---------------------------------------------------------------------------- Conv2d


@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_conv_input_rows_equal_unfold_reference(cfg):
    conv, x = _conv(cfg), _input(cfg)
    rows = Conv2dHandler().input_rows(conv, x)
    ref = unfold_reference(conv, x)
    if conv.bias is not None:
        ref = torch.cat([ref, torch.ones(*ref.shape[:-1], 1, dtype=DTYPE)], dim=-1)
    out = conv(x)
    assert rows.shape == (x.shape[0], out.shape[2] * out.shape[3], conv.weight[0].numel() + (conv.bias is not None))
    assert_close_report(rows, ref, rtol=0.0, atol=0.0, name="input_rows vs unfold_reference")


@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_conv_patches_match_weight_layout(cfg):
    """``h_t = Ŵ â_t``: the patch order is the order of ``weight.reshape(out, -1)`` and of the locations."""
    conv, x = _conv(cfg), _input(cfg)
    handler = Conv2dHandler()
    rows = handler.input_rows(conv, x)  # (n, T, in+1)
    w_hat = handler.weight_matrix(conv)  # (out, in+1)
    out = conv(x)
    expected = out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2)  # (n, T, out), t = row * Wo + col
    assert_close_report(rows @ w_hat.T, expected, rtol=1e-12, name="Ŵ â_t vs conv output")


def test_conv_output_rows_order():
    conv = _conv(CONV_CONFIGS[0])
    vec = torch.randn(2, 3, 3, 4, 5, dtype=DTYPE)  # (K, n, out, Ho, Wo)
    rows = Conv2dHandler().output_rows(conv, vec)
    assert rows.shape == (2, 3, 20, 3)
    for k in range(2):
        for n in range(3):
            for r in range(4):
                for s in range(5):
                    assert torch.equal(rows[k, n, r * 5 + s], vec[k, n, :, r, s])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(groups=2), "groups"),
        (dict(padding_mode="reflect", padding=1), "padding_mode"),
        (dict(padding="same"), "string padding"),
    ],
)
def test_conv_unsupported_configurations_raise(kwargs, match):
    conv = nn.Conv2d(2, 4, 3, **kwargs).to(DTYPE)
    x = torch.randn(2, 2, 5, 5, dtype=DTYPE)
    with pytest.raises(ValueError, match=match):
        Conv2dHandler().input_rows(conv, x)
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    model(x)
    with pytest.raises(ValueError, match=match):
        cv.fit_kronecker(model, (x, torch.zeros(2, dtype=torch.long)), cv.CrossEntropy(), method="kflr")


# ---------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("bias", [True, False])
def test_linear_rows_with_extra_dimensions(bias):
    lin = nn.Linear(4, 3, bias=bias).to(DTYPE)
    handler = LinearHandler()
    x = torch.randn(2, 5, 4, dtype=DTYPE)  # (n, T, in)
    rows = handler.input_rows(lin, x)
    assert rows.shape == (2, 5, 4 + bias)
    assert torch.equal(rows[..., :4], x)
    if bias:
        assert torch.equal(rows[..., 4], torch.ones(2, 5, dtype=DTYPE))
    w_hat = handler.weight_matrix(lin)
    assert_close_report(rows @ w_hat.T, lin(x), rtol=1e-12, name="Ŵ â vs linear output")
    vec = torch.randn(3, 2, 5, 3, dtype=DTYPE)
    assert torch.equal(handler.output_rows(lin, vec), vec)
    assert torch.equal(handler.output_rows(lin, vec[:, :, 0]), vec[:, :, :1])


# ---------------------------------------------------------------------------- Ŵ layout


@pytest.mark.parametrize(
    "module",
    [nn.Linear(4, 3), nn.Linear(4, 3, bias=False), nn.Conv2d(2, 3, (2, 3)), nn.Conv2d(2, 3, 2, bias=False)],
    ids=["linear", "linear-nobias", "conv", "conv-nobias"],
)
def test_weight_matrix_layout_and_round_trip(module):
    module = module.to(DTYPE)
    handler = cv.layers.handler_for(module)
    out, cols = handler.matrix_shape(module)
    n_in = module.weight[0].numel()
    assert (out, cols) == (module.weight.shape[0], n_in + (module.bias is not None))
    w_hat = handler.weight_matrix(module)
    assert w_hat.shape == (out, cols)
    assert torch.equal(w_hat[:, :n_in], module.weight.reshape(out, -1))
    if module.bias is not None:
        assert torch.equal(w_hat[:, -1], module.bias)
    new = torch.arange(out * cols, dtype=DTYPE).reshape(out, cols)
    handler.set_weight_matrix(module, new)
    assert torch.equal(handler.weight_matrix(module), new)
    lead = torch.stack([new, 2 * new])
    w, b = handler.split_matrix(module, lead)
    assert w.shape == (2, *module.weight.shape) and torch.equal(w[1], 2 * module.weight)
    if module.bias is None:
        assert b is None
    else:
        assert torch.equal(b[1], 2 * module.bias)


# ---------------------------------------------------------------------------- find_layers


class OwnParameter(nn.Module):
    """A module that owns a Parameter directly (no handler) next to a Linear child."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * self.scale


def test_find_layers_order_and_names():
    layers = cv.find_layers(MLP_TANH.build())
    assert [layer.name for layer in layers] == ["0", "2", "4"]
    assert [layer.shape for layer in layers] == [(5, 5), (4, 6), (3, 5)]
    layers = cv.find_layers(BRANCHY.build())
    assert [layer.name for layer in layers] == ["conv", "lin", "head"]
    assert [type(layer.handler) for layer in layers] == [Conv2dHandler, LinearHandler, LinearHandler]
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), nn.Linear(3, 1))
    assert [layer.name for layer in cv.find_layers(nested)] == ["0.0", "1"]
    assert [layer.name for layer in cv.find_layers(nn.Linear(2, 2))] == [""]


def test_find_layers_exclude_and_include():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3)), nn.ReLU(), nn.Linear(3, 1))
    assert [layer.name for layer in cv.find_layers(model, exclude=["0"])] == ["2"]
    assert [layer.name for layer in cv.find_layers(model, exclude=["0.1"])] == ["0.0", "2"]
    assert [layer.name for layer in cv.find_layers(model, include=["2", "0.1"])] == ["0.1", "2"]
    with pytest.raises(ValueError, match="not found"):
        cv.find_layers(model, include=["7"])
    with pytest.raises(ValueError, match="no trainable"):
        cv.find_layers(model, exclude=["0", "2"])


@pytest.mark.parametrize(
    "bad, name",
    [
        (nn.LSTM(3, 3, batch_first=True), "1"),
        (nn.BatchNorm1d(3), "1"),
        (nn.LayerNorm(3), "1"),
        (OwnParameter(), "1"),
    ],
    ids=["lstm", "batchnorm", "layernorm", "own-parameter"],
)
def test_unknown_parameterised_layer_raises_unless_frozen_or_excluded(bad, name):
    model = nn.Sequential(nn.Linear(4, 3), bad)
    with pytest.raises(ValueError, match=rf"{name}.*{type(bad).__name__}.*exclude"):
        cv.find_layers(model)
    x = torch.randn(5, 4) if not isinstance(bad, nn.LSTM) else torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match=type(bad).__name__):
        cv.fit_kronecker(model, (x, torch.zeros(5, dtype=torch.long)), cv.CrossEntropy(), method="kflr")
    assert [layer.name for layer in cv.find_layers(model, exclude=[name])] == ["0"]
    own = [p for p in bad.parameters(recurse=False)]
    for p in own:
        p.requires_grad_(False)
    if own:
        names = [layer.name for layer in cv.find_layers(model)]
        assert names[0] == "0" and "1" not in names
    for p in own:
        p.requires_grad_(True)


def test_partially_frozen_layer_raises():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        cv.find_layers(model)
    model[2].weight.requires_grad_(False)
    assert [layer.name for layer in cv.find_layers(model)] == ["0"]


def test_register_handler_teaches_a_new_type(monkeypatch):
    class MyLinear(nn.Linear):
        pass

    monkeypatch.setattr(registry, "_HANDLERS", dict(registry._HANDLERS))
    torch.manual_seed(0)
    model = nn.Sequential(MyLinear(4, 3), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)
    with pytest.raises(ValueError, match="MyLinear"):
        cv.find_layers(model)
    cv.register_handler(MyLinear, LinearHandler())
    plain = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    ours = cv.fit_kronecker(model, (x, y), cv.CrossEntropy(), method="kflr")
    ref = cv.fit_kronecker(plain, (x, y), cv.CrossEntropy(), method="kflr")
    for name in ("0", "2"):
        assert_close_report(ours[name].A, ref[name].A, rtol=1e-14, name=f"A {name}")
        assert_close_report(ours[name].G, ref[name].G, rtol=1e-14, name=f"G {name}")
