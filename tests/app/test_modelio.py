"""Importing uploaded models: real exports round-trip into real layers; hostile uploads are refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import sys
import warnings
import zipfile
import zlib

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from app.domain.modelio import (
    ERROR_CODES,
    ImportedModel,
    ModelImportError,
    apply_output_activation,
    load_model,
    verify_reproduces,
)
from app.domain.modelio.modules import GraphProgram
from curvature import CrossEntropy, Curvature, fit_kronecker, supported_curvatures

BATCH = torch.export.Dim("batch")
UNPICKLED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny convolutions are far faster single-threaded on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- models and exporters ---------------------------------------------------------------------------


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 5 * 5, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.block = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.relu(self.block(h)))


class BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.bn1 = nn.BatchNorm1d(5)
        with torch.no_grad():
            for bn in (self.bn, self.bn1):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.bn1(self.fc(torch.flatten(x, 1)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10), nn.Softmax(dim=-1))


def _tanh_regressor() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


MODELS = {
    "mlp": (_mlp, (1, 28, 28), "softmax"),
    "tanh_regressor": (_tanh_regressor, (8,), None),
    "lenet": (LeNet, (1, 28, 28), None),
}


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], *, dynamo: bool, **kwargs) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, *input_shape),), buf, dynamo=dynamo, input_names=["x"], verbose=False, **kwargs
        )
    return buf.getvalue()


def export_pt2(model: nn.Module, input_shape: tuple[int, ...], *, dynamic: bool, decompose: bool = False) -> bytes:
    shapes = ({0: BATCH},) if dynamic else None
    program = torch.export.export(model, (torch.randn(2, *input_shape),), dynamic_shapes=shapes)
    if decompose:
        program = program.run_decompositions()
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


EXPORTERS = {
    # fixed batch: the dynamo exporter bakes the batch size into Reshape(allowzero=1) targets
    "onnx-dynamo": (lambda m, s: export_onnx(m, s, dynamo=True), "model.onnx"),
    # dynamic batch: view(x.size(0), -1) becomes Shape/Gather/Unsqueeze/Concat/Reshape
    "onnx-legacy": (lambda m, s: export_onnx(m, s, dynamo=False, dynamic_axes={"x": {0: "batch"}}), "model.onnx"),
    "pt2": (lambda m, s: export_pt2(m, s, dynamic=True), "model.pt2"),
}


@pytest.fixture(scope="module")
def exported() -> dict[tuple[str, str], tuple[nn.Module, bytes]]:
    """Each test model exported by each exporter (done once: dynamo exports take seconds)."""
    out = {}
    for name, (factory, shape, _) in MODELS.items():
        torch.manual_seed(0)
        model = factory().eval()
        for exporter, (export, _) in EXPORTERS.items():
            out[(name, exporter)] = (model, export(model, shape))
    return out


def _layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def assert_close_report(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        bad = ~torch.isclose(got, expected, rtol=rtol, atol=atol)
        idx = bad.nonzero()[:5].tolist()
        rows = [f"{i}: got {got[tuple(i)].item():.8g}, expected {expected[tuple(i)].item():.8g}" for i in idx]
        pytest.fail(f"{int(bad.sum())} entries differ; first: " + "; ".join(rows))


# -- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_round_trip(exported, model_name: str, exporter: str) -> None:
    original, data = exported[(model_name, exporter)]
    _, shape, activation = MODELS[model_name]
    imported = load_model(data, EXPORTERS[exporter][1])

    assert isinstance(imported, ImportedModel)
    assert isinstance(imported.module, nn.Sequential), imported.module
    assert imported.input_shape == shape
    assert imported.output_activation == activation
    assert imported.format == ("pt2" if exporter == "pt2" else "onnx")
    assert imported.sha256 == hashlib.sha256(data).hexdigest()
    assert not imported.module.training

    ours, theirs = _layers(imported.module), _layers(original)
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    for mine, ref in zip(ours, theirs, strict=True):
        assert torch.equal(mine.weight, ref.weight)
        assert torch.equal(mine.bias, ref.bias)
        assert mine.weight.dtype == torch.float32 and mine.weight.requires_grad
    assert all(not list(m.parameters(recurse=False)) for m in imported.module.modules() if m not in ours)

    x = torch.randn(7, *shape)  # a batch size the model was not exported with
    with torch.no_grad():
        logits = imported.module(x)
        expected = original(x)
        expected_logits = original[:-1](x) if activation else expected
    assert imported.output_dim == expected.shape[1]
    assert_close_report(logits, expected_logits)
    assert_close_report(apply_output_activation(logits, imported.output_activation), expected)


def test_pt2_keeps_layer_names(exported) -> None:
    imported = load_model(exported[("lenet", "pt2")][1], "lenet.pt2")
    names = [name for name, m in imported.module.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert names == ["features_0", "features_3", "classifier_0", "classifier_2"]


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")
def test_pt2_core_aten_decomposition_with_fixed_batch() -> None:
    torch.manual_seed(1)
    model = LeNet().eval()
    data = export_pt2(model, (1, 28, 28), dynamic=False, decompose=True)
    imported = load_model(data, "lenet.pt2")
    assert isinstance(imported.module, nn.Sequential)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close_report(imported.module(x), model(x))


@pytest.mark.parametrize("exporter", ["onnx-legacy", "pt2"])
def test_residual_graph_becomes_a_program(exporter: str) -> None:
    torch.manual_seed(2)
    model = ResidualMLP().eval()
    imported = load_model(EXPORTERS[exporter][0](model, (6,)), EXPORTERS[exporter][1])
    assert isinstance(imported.module, GraphProgram)
    assert [type(m) for m in _layers(imported.module)] == [nn.Linear] * 3
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert_close_report(imported.module(x), model(x))


@pytest.mark.parametrize("exporter", ["onnx-legacy-unfolded", "pt2"])
def test_batch_norm_is_folded_into_the_preceding_layer(exporter: str) -> None:
    torch.manual_seed(3)
    model = BatchNormCNN().eval()
    if exporter == "pt2":
        data, name = export_pt2(model, (3, 8, 8), dynamic=True), "bn.pt2"
    else:  # keeps BatchNormalization nodes in the ONNX graph
        options = {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE}
        data, name = export_onnx(model, (3, 8, 8), dynamo=False, **options), "bn.onnx"
        assert "BatchNormalization" in {n.op_type for n in onnx.load_from_string(data).graph.node}
    imported = load_model(data, name)
    assert isinstance(imported.module, nn.Sequential)
    assert [type(m) for m in imported.module.modules() if list(m.parameters(recurse=False))] == [
        nn.Conv2d,
        nn.Linear,
    ]
    assert imported.module[0].bias is not None  # the folded batch-norm shift
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert_close_report(imported.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_dynamic_spatial_input_needs_an_input_shape() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    model.eval()
    data = export_onnx(model, (1, 10, 10), dynamo=False, dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    with pytest.raises(ModelImportError) as err:
        load_model(data, "gap.onnx")
    assert err.value.code == "bad_input_shape"
    imported = load_model(data, "gap.onnx", input_shape=(1, 12, 12))
    assert imported.input_shape == (1, 12, 12)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert_close_report(imported.module(x), model(x))


def test_input_shape_contradicting_the_graph_is_refused(exported) -> None:
    with pytest.raises(ModelImportError) as err:
        load_model(exported[("tanh_regressor", "onnx-dynamo")][1], "m.onnx", input_shape=(9,))
    assert err.value.code == "bad_input_shape"


# -- the dry run ------------------------------------------------------------------------------------


def test_verify_reproduces(exported) -> None:
    original, data = exported[("mlp", "pt2")]
    imported = load_model(data, "mlp.pt2")
    probe = torch.randn(4, 1, 28, 28)
    verify_reproduces(imported, original, probe)
    with pytest.raises(ModelImportError) as err:
        verify_reproduces(imported, lambda p: original(p) + 1e-3, probe)
    assert err.value.code == "output_mismatch" and err.value.detail["max_abs_error"] > 0
    with pytest.raises(ModelImportError) as err:
        verify_reproduces(imported, lambda p: original(p) * float("nan"), probe)
    assert err.value.code == "non_finite_output"


def test_load_model_dry_run_catches_a_wrong_rebuild(exported, monkeypatch) -> None:
    from app.domain.modelio import onnx_import

    def wrong(self, node, attrs):
        self._activation(node, nn.Tanh(), "relu")

    monkeypatch.setattr(onnx_import._OnnxTranslator, "_op_Relu", wrong)
    with pytest.raises(ModelImportError) as err:
        load_model(exported[("mlp", "onnx-legacy")][1], "mlp.onnx")
    assert err.value.code == "output_mismatch"


# -- hostile and broken uploads ---------------------------------------------------------------------


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Unpickling this calls ``_record_unpickling``: any load of it is visible in ``UNPICKLED``."""

    def __reduce__(self):
        return (_record_unpickling, ("payload",))


def _expect(code: str, data: bytes, filename: str, **kwargs) -> ModelImportError:
    UNPICKLED.clear()
    with pytest.raises(ModelImportError) as err:
        load_model(data, filename, **kwargs)
    assert err.value.code == code, err.value
    assert UNPICKLED == []
    assert code in ERROR_CODES and err.value.to_dict()["code"] == code
    return err.value


@pytest.mark.parametrize("filename", ["model.pt2", "model.pt", "model.onnx"])
def test_torch_save_checkpoint_is_refused_unread(filename: str) -> None:
    buf = io.BytesIO()
    torch.save({"weight": torch.ones(2), "hook": Payload()}, buf)
    _expect("pickle_refused", buf.getvalue(), filename)


def test_legacy_pickle_file_is_refused_unread() -> None:
    buf = io.BytesIO()
    torch.save({"hook": Payload()}, buf, _use_new_zipfile_serialization=False)
    _expect("pickle_refused", buf.getvalue(), "model.pth")
    _expect("pickle_refused", pickle.dumps(Payload(), protocol=4), "model.onnx")


def _rewrite_zip(data: bytes, edit) -> bytes:
    """Copy a zip archive, passing each member's (path, bytes) through ``edit``."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, edit(info.filename, src.read(info)))
    return buf.getvalue()


def test_pt2_with_pickled_weight_is_refused_unread(exported) -> None:
    evil = io.BytesIO()
    torch.save(Payload(), evil)

    def edit(path: str, content: bytes) -> bytes:
        if path.endswith("model_weights_config.json"):
            config = json.loads(content)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        if path.endswith("data/weights/weight_0"):
            return evil.getvalue()
        return content

    _expect("pickle_refused", _rewrite_zip(exported[("mlp", "pt2")][1], edit), "model.pt2")


def test_pt2_symbolic_expressions_are_never_evaluated(exported, tmp_path) -> None:
    # sympy.sympify (which torch.export.load applies to these strings) would run this and create the file
    marker = tmp_path / "evaluated"
    injected = f"sympify.__globals__['__builtins__']['__import__']('pathlib').Path({str(marker)!r}).touch()"

    def edit(path: str, content: bytes) -> bytes:
        if path.endswith("models/model.json"):
            text = content.decode()
            assert "Symbol(" in text
            return text.replace("Symbol(", injected + " or Symbol(").encode()
        return content

    original, data = exported[("tanh_regressor", "pt2")]
    imported = load_model(_rewrite_zip(data, edit), "model.pt2")
    assert not marker.exists()
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close_report(imported.module(x), original(x))


def test_pt2_with_compiled_code_is_refused(exported) -> None:
    data = exported[("mlp", "pt2")][1]
    src = zipfile.ZipFile(io.BytesIO(data))
    root = src.namelist()[0].split("/")[0]
    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a") as archive:
        archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    _expect("invalid_pt2", buf.getvalue(), "model.pt2")


def test_pt2_with_unsupported_aten_op() -> None:
    class CumSum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(self.fc(x), dim=1)

    error = _expect("unsupported_op", export_pt2(CumSum().eval(), (4,), dynamic=False), "model.pt2")
    assert error.detail["op"] == "aten.cumsum.default"


def test_truncated_onnx(exported) -> None:
    data = exported[("mlp", "onnx-dynamo")][1]
    _expect("invalid_onnx", data[: len(data) // 2], "model.onnx")


def test_random_bytes() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _expect("invalid_onnx", noise, "model.onnx")
    _expect("unknown_format", b"\x01" + noise, "model.bin")
    _expect("not_a_pt2", noise, "model.pt2")


def test_onnx_lstm_is_unsupported() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])

    error = _expect("unsupported_op", export_onnx(Recurrent().eval(), (5, 4), dynamo=False), "lstm.onnx")
    assert "LSTM" in error.detail["ops"]


def _onnx_model(nodes, initializers=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _weight(name: str = "w") -> TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [3, 4], np.ones(12, dtype=np.float32))


def test_onnx_custom_domain_op_is_unsupported() -> None:
    model = _onnx_model(
        [
            helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
            helper.make_node("Pwn", ["h"], ["y"], domain="com.example.evil"),
        ],
        [_weight()],
        opsets=(("", 17), ("com.example.evil", 1)),
    )
    error = _expect("unsupported_op", model.SerializeToString(), "custom.onnx")
    assert error.detail["ops"] == ["com.example.evil::Pwn"]


def test_onnx_external_data_is_refused_before_reading(tmp_path) -> None:
    weight = _weight()
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "/etc/passwd"), ("offset", "0"), ("length", "48")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    model = _onnx_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [weight])
    error = _expect("invalid_onnx", model.SerializeToString(), "external.onnx")
    assert "external" in error.message


def _const(name: str, value, dtype=np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _random(name: str, *shape: int, positive: bool = False) -> TensorProto:
    value = np.random.default_rng(zlib.crc32(name.encode())).normal(size=shape)
    return _const(name, np.abs(value) + 0.5 if positive else value)


def _graph(nodes, initializers, in_shape, out_shape, opset: int = 17) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


# Each case imports only if the rebuilt module matches onnx.reference on the dry-run probe.
HAND_BUILT = {
    "gemm_alpha_beta_transB0": lambda: _graph(
        [helper.make_node("Gemm", ["x", "b", "c"], ["y"], alpha=0.5, beta=2.0)],
        [_random("b", 4, 3), _random("c", 1, 3)],
        ["n", 4],
        ["n", 3],
    ),
    "conv_same_upper_stride2": lambda: _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
        ],
        [_random("w", 2, 1, 4, 4), _random("fw", 3, 32)],
        ["n", 1, 7, 7],
        ["n", 3],
    ),
    "pools_squeeze_matmul_add": lambda: _graph(
        [
            helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
            helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalMaxPool", ["a"], ["g"]),
            helper.make_node("Squeeze", ["g", "axes"], ["s"]),
            helper.make_node("MatMul", ["s", "mw"], ["mm"]),
            helper.make_node("Add", ["mm", "mb"], ["y"]),
        ],
        [_const("axes", [2, 3], np.int64), _random("mw", 2, 3), _random("mb", 3)],
        ["n", 2, 8, 8],
        ["n", 3],
    ),
    "input_normalisation_and_softmax": lambda: _graph(
        [
            helper.make_node("Sub", ["x", "mean"], ["s"]),
            helper.make_node("Div", ["s", "std"], ["d"]),
            helper.make_node("Gemm", ["d", "w", "b"], ["g"], transB=1),
            helper.make_node("Mul", ["g", "k"], ["m"]),
            helper.make_node("LeakyRelu", ["m"], ["y0"], alpha=0.1),
            helper.make_node("Softmax", ["y0"], ["y"], axis=1),
        ],
        [_random("mean", 4), _random("std", 4, positive=True), _random("w", 3, 4), _random("b", 3), _random("k", 3)],
        ["n", 4],
        ["n", 3],
    ),
    "opset9_clip_attributes_and_batchnorm": lambda: _graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
            helper.make_node("Clip", ["g"], ["c"], min=-1.0, max=0.5),
            helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["bn"], epsilon=1e-3),
            helper.make_node("Gemm", ["bn", "w2", "b2"], ["y"], transB=1),
        ],
        [
            *(_random(n, 5) for n in ("b", "s", "bb", "mu")),
            _random("var", 5, positive=True),
            _random("w", 5, 4),
            _random("w2", 3, 5),
            _random("b2", 3),
        ],
        ["n", 4],
        ["n", 3],
        opset=9,
    ),
    "asymmetric_pads_bias_add_batchnorm_reshape_sigmoid": lambda: _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[0, 1, 2, 0]),
            helper.make_node("Add", ["c", "cb"], ["ca"]),
            helper.make_node("BatchNormalization", ["ca", "s", "bb", "mu", "var"], ["bn"]),
            helper.make_node("Tanh", ["bn"], ["t"]),
            helper.make_node("Reshape", ["t", "shape"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["g"], transB=1),
            helper.make_node("Sigmoid", ["g"], ["y"]),
        ],
        [
            _random("w", 3, 2, 3, 3),
            _random("cb", 3, 1, 1),
            *(_random(n, 3) for n in ("s", "bb", "mu")),
            _random("var", 3, positive=True),
            _const("shape", [0, -1], np.int64),
            _random("w2", 2, 60),
            _random("b2", 2),
        ],
        ["n", 2, 5, 5],
        ["n", 2],
    ),
    "conv_same_lower_even_kernel_and_swish": lambda: _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_LOWER"),
            helper.make_node("Sigmoid", ["c"], ["s"]),
            helper.make_node("Mul", ["s", "c"], ["m"]),
            helper.make_node("Flatten", ["m"], ["f"]),
            helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
        ],
        [_random("w", 2, 1, 4, 4), _random("fw", 3, 98)],
        ["n", 1, 7, 7],
        ["n", 3],
    ),
    "softplus_threshold_pattern": lambda: _graph(
        [
            helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
            helper.make_node("Softplus", ["g"], ["sp"]),
            helper.make_node("Greater", ["g", "t"], ["gt"]),
            helper.make_node("Where", ["gt", "g", "sp"], ["h"]),
            helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1),
        ],
        [_random("w", 5, 4), _const("t", 0.5), _random("w2", 3, 5)],
        ["n", 4],
        ["n", 3],
    ),
}


@pytest.mark.parametrize("case", list(HAND_BUILT))
def test_hand_built_onnx_graphs_match_the_onnx_reference(case: str) -> None:
    imported = load_model(HAND_BUILT[case](), f"{case}.onnx")
    assert isinstance(imported.module, nn.Sequential)
    assert all(
        isinstance(m, (nn.Linear, nn.Conv2d)) for m in imported.module.modules() if list(m.parameters(recurse=False))
    )


def test_hand_built_gemm_against_its_formula() -> None:
    rng = np.random.default_rng(5)
    b = rng.normal(size=(4, 3)).astype(np.float32)  # transB=0: (in, out)
    c = rng.normal(size=(1, 3)).astype(np.float32)
    data = _graph(
        [helper.make_node("Gemm", ["x", "b", "c"], ["y"], alpha=0.5, beta=2.0)],
        [_const("b", b), _const("c", c)],
        ["n", 4],
        ["n", 3],
    )
    imported = load_model(data, "gemm.onnx")
    x = torch.randn(6, 4)
    expected = 0.5 * x @ torch.from_numpy(b) + 2.0 * torch.from_numpy(c)
    with torch.no_grad():
        assert_close_report(imported.module(x), expected)


def test_zip_that_is_not_a_pt2() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")
    _expect("not_a_pt2", buf.getvalue(), "model.pt2")


def test_oversized_upload_and_zip_bomb(exported) -> None:
    data = exported[("mlp", "onnx-dynamo")][1]
    error = _expect("too_large", data, "model.onnx", max_bytes=1000)
    assert error.detail["max_bytes"] == 1000
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/archive_format", "pt2")
        archive.writestr("archive/data/weights/weight_0", bytes(4 * 2**20))
    assert len(buf.getvalue()) < 2**20
    _expect("too_large", buf.getvalue(), "bomb.pt2", max_bytes=2**20)


def test_huge_activation_is_refused_before_allocation() -> None:
    padded = _graph(  # a 2-channel 8001 x 8001 feature map (128M values) from a 1-pixel input
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[4000, 4000, 4000, 4000]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("MatMul", ["f", "w2"], ["y"]),
        ],
        [_random("w", 2, 1, 1, 1), _random("w2", 2, 3)],
        ["n", 1, 1, 1],
        ["n", 3],
    )
    error = _expect("too_large", padded, "padded.onnx")
    assert error.detail["op"] == "Conv"


def test_error_codes_are_checked() -> None:
    with pytest.raises(ValueError):
        ModelImportError("no_such_code", "x")
    error = ModelImportError("unsupported_op", "Foo is not supported", {"op": "Foo"})
    assert isinstance(error, ValueError)
    assert error.to_dict() == {"code": "unsupported_op", "message": "Foo is not supported", "detail": {"op": "Foo"}}


# -- what users export every day, and what the curvature core cannot fit -------------------------------


def _silu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3))


def _silu_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def _same_conv(kernel: int, dilation: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 7 * 7, 4)
    )


def _grouped_conv(groups: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 4, 3, groups=groups), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


EVERYDAY_EXPORTERS = {
    **EXPORTERS,
    # run_decompositions() writes SiLU as sigmoid and mul, and an even-kernel "same" padding as constant_pad_nd
    "pt2-core-aten": (lambda m, s: export_pt2(m, s, dynamic=False, decompose=True), "model.pt2"),
}


def _import_and_compare(model: nn.Module, shape: tuple[int, ...], exporter: str) -> ImportedModel:
    export, filename = EVERYDAY_EXPORTERS[exporter]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imported = load_model(export(model, shape), filename)
    x = torch.randn(2 if exporter == "pt2-core-aten" else 5, *shape)
    with torch.no_grad():
        assert_close_report(imported.module(x), model(x), rtol=1e-5, atol=1e-5)
    return imported


@pytest.mark.parametrize("exporter", list(EVERYDAY_EXPORTERS))
@pytest.mark.parametrize("model_name", ["silu_mlp", "silu_cnn"])
def test_silu_imports_as_nn_silu(model_name: str, exporter: str) -> None:
    torch.manual_seed(6)
    model, shape = (_silu_mlp(), (6,)) if model_name == "silu_mlp" else (_silu_cnn(), (1, 8, 8))
    imported = _import_and_compare(model.eval(), shape, exporter)
    kinds = [type(m) for m in imported.module.children()]
    assert kinds.count(nn.SiLU) == (2 if model_name == "silu_mlp" else 1) and nn.Sigmoid not in kinds, kinds
    curvatures = supported_curvatures(imported.module)
    assert (Curvature.kfra in curvatures) == (model_name == "silu_mlp")


GATES = {
    "silu": [helper.make_node("Sigmoid", ["b"], ["s"])],
    "mish": [helper.make_node("Softplus", ["b"], ["sp"]), helper.make_node("Tanh", ["sp"], ["s"])],
}


@pytest.mark.parametrize("gate", list(GATES))
def test_a_gate_on_another_activation_is_not_silu_or_mish(gate: str) -> None:
    """``a * sigmoid(b)`` and ``a * tanh(softplus(b))`` with ``a ≠ b`` are not SiLU or Mish."""
    data = _graph(
        [
            helper.make_node("Gemm", ["x", "w"], ["a"], transB=1),
            helper.make_node("Gemm", ["x", "w2"], ["b"], transB=1),
            *GATES[gate],
            helper.make_node("Mul", ["a", "s"], ["y"]),
        ],
        [_random("w", 3, 4), _random("w2", 3, 4)],
        ["n", 4],
        ["n", 3],
    )
    error = _expect("unsupported_op", data, "gated.onnx")
    assert error.detail["op"] == "Mul" and "SiLU" in error.message and "Mish" in error.message


@pytest.mark.parametrize("exporter", list(EVERYDAY_EXPORTERS))
@pytest.mark.parametrize("kernel", [3, 4])
def test_padding_same_becomes_integer_padding_the_core_can_fit(kernel: int, exporter: str) -> None:
    torch.manual_seed(7)
    imported = _import_and_compare(_same_conv(kernel).eval(), (2, 7, 7), exporter)
    (conv,) = [m for m in imported.module.modules() if isinstance(m, nn.Conv2d)]
    pads = [m.padding for m in imported.module.modules() if isinstance(m, nn.ZeroPad2d)]
    assert isinstance(conv.padding, tuple)
    if kernel % 2:  # symmetric: plain integer padding on the layer
        assert conv.padding == (1, 1) and not pads
    else:  # one more pixel at the bottom and the right: an nn.ZeroPad2d in front
        (left, right, top, bottom), (ph, pw) = pads[0], conv.padding
        assert len(pads) == 1 and (top + ph, left + pw, bottom + ph, right + pw) == (1, 1, 2, 2)
    x, y = torch.randn(6, 2, 7, 7), torch.randint(0, 4, (6,))
    factors = fit_kronecker(imported.module, (x, y), CrossEntropy(), method="kflr")
    assert len(factors.layers) == 2


def test_dilated_padding_same_from_pt2() -> None:
    torch.manual_seed(8)
    imported = _import_and_compare(_same_conv(3, dilation=2).eval(), (2, 7, 7), "pt2")
    assert [m.padding for m in imported.module.modules() if isinstance(m, nn.Conv2d)] == [(2, 2)]


@pytest.mark.parametrize("exporter", ["onnx-dynamo", "onnx-legacy", "pt2"])
@pytest.mark.parametrize("groups", [2, 4], ids=["grouped", "depthwise"])
def test_grouped_convolution_is_refused_at_upload(groups: int, exporter: str) -> None:
    export, filename = EXPORTERS[exporter]
    data = export(_grouped_conv(groups).eval(), (4, 7, 7))
    error = _expect("unsupported_layer", data, filename)
    assert error.detail["groups"] == groups
    assert "grouped convolution" in error.message and "groups=1" in error.message


# -- ONNX external data ---------------------------------------------------------------------------------


def _zip(members: dict[str, bytes], *, links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, content)
    return buf.getvalue()


@pytest.fixture(scope="module")
def external_export(tmp_path_factory) -> tuple[nn.Module, dict[str, bytes]]:
    """A model exported the default way (``torch.onnx.export`` to a path): weights in ``model.onnx.data``."""
    torch.manual_seed(9)
    model = _silu_mlp().eval()
    folder = tmp_path_factory.mktemp("export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 6),), folder / "model.onnx", input_names=["x"])
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(files) == ["model.onnx", "model.onnx.data"]
    stored = onnx.load_from_string(files["model.onnx"])
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    return model, files


@pytest.mark.parametrize("folder", ["", "export/"])
def test_onnx_external_data_imports_from_a_zip_archive(external_export, folder: str) -> None:
    model, files = external_export
    members = {folder + name: content for name, content in files.items()}
    members["__MACOSX/._model.onnx"] = b"\x00\x05\x16\x07"  # what macOS's archiver adds
    data = _zip(members)
    imported = load_model(data, "model.zip")
    assert imported.format == "onnx" and imported.sha256 == hashlib.sha256(data).hexdigest()
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert_close_report(imported.module(x), model(x))
    assert Curvature.kfra in supported_curvatures(imported.module)


def test_onnx_external_data_without_its_files_names_them(external_export) -> None:
    _, files = external_export
    error = _expect("invalid_onnx", files["model.onnx"], "model.onnx")
    assert error.detail["missing"] == ["model.onnx.data"] and "external_data=False" in error.message
    error = _expect("invalid_onnx", _zip({"model.onnx": files["model.onnx"]}), "model.zip")
    assert error.detail["missing"] == ["model.onnx.data"]


def _external_gemm(location: str) -> bytes:
    """A Gemm whose (3, 4) float weight lives in 48 external bytes at ``location``."""
    weight = _weight()
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return _onnx_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [weight]).SerializeToString()


WEIGHTS = np.arange(12, dtype=np.float32).tobytes()


def test_external_gemm_imports_from_its_archive() -> None:
    imported = load_model(_zip({"m/model.onnx": _external_gemm("./w.bin"), "m/w.bin": WEIGHTS}), "m.zip")
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert_close_report(imported.module(x), x @ torch.arange(12.0).reshape(3, 4).T)


# (members, code): each archive would import if the importer followed the path it names to the file the test
# writes outside the upload
HOSTILE_ARCHIVES = {
    "member climbing out": (lambda secret: {"model.onnx": _external_gemm("w.bin"), "../w.bin": WEIGHTS}),
    "absolute member": (lambda secret: {"model.onnx": _external_gemm("w.bin"), str(secret): WEIGHTS}),
    "backslash member": (lambda secret: {"model.onnx": _external_gemm("w.bin"), "..\\w.bin": WEIGHTS}),
    "linked member": (lambda secret: {"model.onnx": _external_gemm("w.bin"), "w.bin": str(secret).encode()}),
    "location climbing out": (lambda secret: {"model.onnx": _external_gemm(f"../{secret.name}")}),
    "absolute location": (lambda secret: {"model.onnx": _external_gemm(str(secret))}),
    "url location": (lambda secret: {"model.onnx": _external_gemm(f"file://{secret}")}),
    "location climbing out of a folder": (
        lambda secret: {"a/model.onnx": _external_gemm("b/../../w.bin"), "w.bin": WEIGHTS}
    ),
}


OPENED: list[str] = []
AUDITING = [False]


@pytest.fixture(scope="module")
def _open_audit_hook() -> None:
    """One audit hook for the module (hooks cannot be removed), recording opened paths while switched on."""

    def hook(event: str, args: tuple) -> None:
        if AUDITING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            OPENED.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)


@pytest.fixture
def opened_files(_open_audit_hook):
    """Paths this process opens while the test runs."""
    OPENED.clear()
    AUDITING[0] = True
    yield OPENED
    AUDITING[0] = False


@pytest.mark.parametrize("case", list(HOSTILE_ARCHIVES))
def test_hostile_onnx_archives_are_refused_without_reading_outside(case: str, tmp_path, opened_files) -> None:
    secret = tmp_path / "w.bin"
    secret.write_bytes(WEIGHTS)
    members = HOSTILE_ARCHIVES[case](secret)
    data = _zip(members, links=("w.bin",) if case == "linked member" else ())
    opened_files.clear()
    _expect("unsafe_archive", data, "model.zip")
    assert not [p for p in opened_files if p.startswith(str(tmp_path))]


def test_oversized_archive_member_is_refused(tmp_path) -> None:
    data = _zip({"model.onnx": _external_gemm("w.bin"), "w.bin": bytes(4 * 2**20)})
    assert len(data) < 2**20  # zeros compress: the limit applies to the unpacked size
    error = _expect("too_large", data, "model.zip", max_bytes=2**20)
    assert error.detail["max_bytes"] == 2**20


def test_external_data_of_the_wrong_size_is_refused() -> None:
    _expect("invalid_onnx", _zip({"model.onnx": _external_gemm("w.bin"), "w.bin": WEIGHTS[:40]}), "model.zip")
    two = _zip({"a.onnx": _external_gemm("w.bin"), "b.onnx": _external_gemm("w.bin"), "w.bin": WEIGHTS})
    error = _expect("invalid_onnx", two, "model.zip")
    assert error.detail["models"] == ["a.onnx", "b.onnx"]


def test_both_importers_map_onto_the_shared_operator_vocabulary() -> None:
    from app.domain.modelio import onnx_import, ops, pt2_import

    for importer in (onnx_import, pt2_import):
        assert {kind for kind, _ in importer._ACTIVATIONS.values()} <= set(ops.ACTIVATIONS)
        assert set(importer._ARITHMETIC.values()) == set(ops.ARITHMETIC)
        assert set(importer._FINAL_ACTIVATIONS.values()) == ops.OUTPUT_ACTIVATIONS
        assert {*importer._ACTIVATIONS, *importer._ARITHMETIC, *importer._FINAL_ACTIVATIONS} <= importer.SUPPORTED_OPS
    logits = torch.randn(3, 4)
    for activation in ops.OUTPUT_ACTIVATIONS:
        assert apply_output_activation(logits, activation).shape == logits.shape


# -- more activations, PReLU and layer normalisation -------------------------------------------------------


def _more_activations_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8), nn.SELU(), nn.Linear(8, 8), nn.Hardswish(), nn.Linear(8, 8), nn.Hardsigmoid(),
        nn.Linear(8, 8), nn.Mish(), nn.Linear(8, 8), nn.PReLU(8), nn.Linear(8, 8), nn.PReLU(),
        nn.AlphaDropout(0.1), nn.Linear(8, 3),
    )  # fmt: skip


def _layer_norm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 3))


def _layer_norm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.LayerNorm([3, 5, 5]), nn.PReLU(3), nn.Dropout2d(0.2), nn.Conv2d(3, 2, 3),
        nn.LayerNorm(3, elementwise_affine=False), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4),
    )  # fmt: skip


def _group_norm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4, affine=True),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    )  # fmt: skip


class TwoBranchCNN(nn.Module):
    """Two convolution branches joined along the channels, and two Linear branches joined along the features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 3, 3)
        self.c, self.d = nn.Linear(5 * 3 * 3, 6), nn.Linear(5 * 3 * 3, 4)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1).flatten(1)
        return self.head(torch.cat([torch.tanh(self.c(h)), torch.sigmoid(self.d(h))], dim=-1))


class TwoBranchMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 5), nn.Linear(6, 4), nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.tanh(self.a(x)), torch.sigmoid(self.b(x))], dim=1))


MORE_MODELS = {
    "more_activations_mlp": (_more_activations_mlp, (6,)),
    "layer_norm_mlp": (_layer_norm_mlp, (6,)),
    "layer_norm_cnn": (_layer_norm_cnn, (1, 7, 7)),
    "concat_mlp": (TwoBranchMLP, (6,)),
    "group_norm_cnn": (_group_norm_cnn, (1, 7, 7)),
}
#: The modules each model must import as, and which exporters write it in a form the importers refuse.
EXPECTED_KINDS = {
    "more_activations_mlp": {"SELU", "Hardswish", "Hardsigmoid", "Mish", "ConstantPReLU"},
    "layer_norm_mlp": {"LayerNorm", "ReLU6"},
    "layer_norm_cnn": {"LayerNorm", "ConstantPReLU"},
    "concat_mlp": {"Concat", "Tanh", "Sigmoid"},
    "group_norm_cnn": {"GroupNorm"},
}
# core aten writes group norm with the batch size as an argument (native_group_norm)
REFUSED_BY = dict.fromkeys(["more_activations_mlp", "layer_norm_cnn", "group_norm_cnn"], "pt2-core-aten")


def _trained_looking(model: nn.Module) -> nn.Module:
    """Non-default affine parameters and slopes (defaults of 1, 0 and 0.25 would hide a dropped constant)."""
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.PReLU, nn.GroupNorm, nn.InstanceNorm2d)):
                for p in module.parameters():
                    p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("exporter", list(EVERYDAY_EXPORTERS))
@pytest.mark.parametrize("model_name", list(MORE_MODELS))
def test_more_activations_and_layer_norm_import_as_fittable_modules(model_name: str, exporter: str) -> None:
    """SELU, Hardswish, Hardsigmoid, Mish, PReLU, LayerNorm, concatenation of activations and inference
    AlphaDropout / Dropout2d rebuild as modules that reproduce the export; their constants are buffers; KFRA
    accepts the element-wise chain only. Core-aten decomposition writes Mish, Hardswish, Hardsigmoid and PReLU as
    arithmetic on two activations, which is refused."""
    torch.manual_seed(13)
    factory, shape = MORE_MODELS[model_name]
    model = _trained_looking(factory())
    if REFUSED_BY.get(model_name) == exporter:
        export, filename = EVERYDAY_EXPORTERS[exporter]
        _expect("unsupported_op", export(model, shape), filename)
        return
    imported = _import_and_compare(model, shape, exporter)
    assert all(
        isinstance(m, (nn.Linear, nn.Conv2d)) for m in imported.module.modules() if list(m.parameters(recurse=False))
    )
    kinds = {type(m).__name__ for m in imported.module.modules()}
    assert EXPECTED_KINDS[model_name] <= kinds, kinds
    assert ("ConstantPReLU" in kinds) == ("ConstantPReLU" in EXPECTED_KINDS[model_name]), kinds
    assert (Curvature.kfra in supported_curvatures(imported.module)) == (model_name == "more_activations_mlp")
    x, y = torch.randn(5, *shape), torch.randint(0, 3, (5,))
    factors = fit_kronecker(imported.module, (x, y), CrossEntropy(), method="kflr")
    assert len(factors.layers) == len(_layers(model))


def _ln_graph(axis: int, *, scale_shape=(3, 3), outputs=("ln",), bias: bool = False) -> bytes:
    inputs = ["c", "s", "b"] if bias else ["c", "s"]
    consts = [_random("w", 2, 1, 3, 3), _random("s", *scale_shape, positive=True), _random("fw", 3, 18)]
    if bias:
        consts.append(_random("b", *scale_shape))
    return _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("LayerNormalization", inputs, list(outputs), axis=axis, epsilon=1e-3),
            helper.make_node("Flatten", [outputs[0]], ["f"]),
            helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
        ],
        consts,
        ["n", 1, 5, 5],
        ["n", 3],
    )


def _act_graph(nodes, consts=()) -> bytes:
    return _graph(
        [
            helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
            *nodes,
            helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1),
        ],
        [_random("w", 5, 4), _random("w2", 3, 5), *consts],
        ["n", 4],
        ["n", 3],
    )


HAND_BUILT_MORE = {
    # ONNX's default HardSigmoid constants (0.2, 0.5) differ from torch's (1/6, 1/2)
    "hardsigmoid_onnx_defaults": lambda: _act_graph([helper.make_node("HardSigmoid", ["g"], ["h"])]),
    "selu_default_attributes": lambda: _act_graph([helper.make_node("Selu", ["g"], ["h"])]),
    "prelu_slope_per_feature": lambda: _act_graph([helper.make_node("PRelu", ["g", "p"], ["h"])], [_random("p", 5)]),
    "prelu_slope_with_batch_axis_of_one": lambda: _act_graph(
        [helper.make_node("PRelu", ["g", "p"], ["h"])], [_random("p", 1, 5)]
    ),
}


@pytest.mark.parametrize("case", list(HAND_BUILT_MORE))
def test_hand_built_activations_match_the_onnx_reference(case: str) -> None:
    imported = load_model(HAND_BUILT_MORE[case](), f"{case}.onnx")  # the dry run compares with onnx.reference
    assert all(
        isinstance(m, (nn.Linear, nn.Conv2d)) for m in imported.module.modules() if list(m.parameters(recurse=False))
    )


@pytest.mark.parametrize("axis", [1, -1, -2, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_hand_built_layer_normalization_over_trailing_axes(axis: int, bias: bool) -> None:
    example = (2, 3, 3)
    first = axis % 4
    shape = example[first - 1 :]
    scale_shape = shape[1:] if len(shape) > 1 else shape  # a scale broadcast over the first normalised axis
    imported = load_model(_ln_graph(axis, scale_shape=scale_shape, bias=bias), "ln.onnx")
    (norm,) = [m for m in imported.module.modules() if type(m).__name__ == "LayerNorm"]
    assert norm.shape == shape and norm.weight.shape == shape and norm.eps == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "case, data, message",
    [
        ("selu_other_constants", lambda: _act_graph([helper.make_node("Selu", ["g"], ["h"], alpha=2.0)]), "SELU"),
        (
            "prelu_slope_over_the_batch",
            lambda: _act_graph([helper.make_node("PRelu", ["g", "p"], ["h"])], [_random("p", 2, 5)]),
            "batch",
        ),
        ("prelu_slope_from_an_activation", lambda: _act_graph([helper.make_node("PRelu", ["g", "g"], ["h"])]), "slope"),
        ("layer_norm_over_the_batch", lambda: _ln_graph(0, scale_shape=(2, 3, 3)), "within each example"),
        (
            "layer_norm_mean_output",
            lambda: _ln_graph(-1, scale_shape=(3,), outputs=("ln", "mean")),
            "normalised output",
        ),
        ("layer_norm_wrong_scale", lambda: _ln_graph(-1, scale_shape=(4,)), "does not fit"),
        (
            "instance_norm_without_spatial_axes",
            lambda: _act_graph(
                [helper.make_node("InstanceNormalization", ["g", "sc", "bi"], ["h"])],
                [_random("sc", 5), _random("bi", 5)],
            ),
            "at least one more axis",
        ),
        (
            "concat_over_the_batch",
            lambda: _act_graph([helper.make_node("Concat", ["g", "g"], ["h"], axis=0)]),
            "within each example",
        ),
        (
            "concat_with_a_constant",
            lambda: _act_graph([helper.make_node("Concat", ["g", "k"], ["h"], axis=1)], [_random("k", 1, 5)]),
            "activation",
        ),
    ],
)
def test_unsupported_settings_are_refused_by_name(case: str, data, message: str) -> None:
    error = _expect("unsupported_op", data(), f"{case}.onnx")
    assert message in error.message, error.message


def test_prelu_slopes_varying_within_a_channel_are_refused() -> None:
    data = _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("PRelu", ["c", "p"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
        ],
        [_random("w", 2, 1, 3, 3), _random("p", 3, 3), _random("fw", 3, 18)],
        ["n", 1, 5, 5],
        ["n", 3],
    )
    error = _expect("unsupported_op", data, "prelu.onnx")
    assert "one per channel" in error.message


@pytest.mark.parametrize("source", [*MORE_MODELS, "two_branch_cnn", "hardsigmoid_onnx"])
def test_imported_modules_export_back_to_onnx_and_reimport(source: str) -> None:
    """Jobs that train a model (optimise, online Laplace) export the imported module to ONNX and import it back:
    every module an upload can become must survive that round trip."""
    from app.domain.modelio.export import export_onnx as export_trained

    if source == "hardsigmoid_onnx":
        imported = load_model(HAND_BUILT_MORE["hardsigmoid_onnx_defaults"](), "h.onnx")
    elif source == "two_branch_cnn":
        torch.manual_seed(14)
        imported = load_model(export_pt2(TwoBranchCNN().eval(), (1, 5, 5), dynamic=True), "m.pt2")
    else:
        torch.manual_seed(14)
        factory, shape = MORE_MODELS[source]
        imported = load_model(export_pt2(_trained_looking(factory()), shape, dynamic=True), "m.pt2")
    x = torch.randn(4, *imported.input_shape)
    again = load_model(export_trained(imported.module, x[:1]), "trained.onnx")
    with torch.no_grad():
        assert_close_report(again.module(x), imported.module(x), rtol=1e-5, atol=1e-6)


def test_instance_norm_with_running_statistics_is_refused() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True), nn.Flatten(), nn.Linear(18, 3)
    )
    error = _expect("unsupported_op", export_pt2(model.eval(), (1, 5, 5), dynamic=True), "m.pt2")
    assert "running statistics" in error.message
