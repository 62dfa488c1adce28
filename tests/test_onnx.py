"""ONNX export with QDQ nodes, run in onnxruntime against the quantized model."""

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.pack.onnx_export import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def run_onnx(path, x, optimize=True):
    opts = ort.SessionOptions()
    if not optimize:  # the graph as written, no fusion into onnxruntime's integer kernels
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def _weight_dtypes(path):
    """dtypes of the weight codes that DequantizeLinear nodes read from initializers; no float
    weight matrix may be left in the file."""
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert not [k for k, v in inits.items() if v.ndim >= 2 and v.dtype.kind == "f"]
    return {
        str(inits[n.input[0]].dtype)
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim >= 2
    }


@pytest.mark.parametrize("packed", [False, True])
def test_w8a8_exports_qdq_and_matches_in_onnxruntime(tmp_path, packed):
    model = qd.quantize_(
        _net(),
        qd.QuantConfig(
            weights=qd.IntFormat(8, axis=0), activations=qd.IntFormat(8, symmetric=False)
        ),
    )
    data = [torch.randn(16, 1, 10, 10) for _ in range(4)]
    qd.calibrate(model, data, progress=False)
    model.eval()
    if packed:
        model = qd.load(qd.save(model, tmp_path / "m.qd.safetensors"), model=_net())
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 10, 10))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # weights: DequantizeLinear of stored codes; inputs: a QuantizeLinear/DequantizeLinear pair
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    x = torch.randn(7, 1, 10, 10)
    with torch.no_grad():
        expected = model(x)
    assert _weight_dtypes(path) == {"uint8"}
    got = run_onnx(path, x)
    # same codes; onnxruntime may round ties in its own order: a few LSBs of the outputs
    assert torch.allclose(got, expected, atol=2e-3 * float(expected.abs().max()))


def test_signed_int8_weights_export_the_same_function(tmp_path):
    model = qd.quantize_(
        _net(),
        qd.QuantConfig(
            weights=qd.IntFormat(8, axis=0), activations=qd.IntFormat(8, symmetric=False)
        ),
    )
    qd.calibrate(model, [torch.randn(16, 1, 10, 10) for _ in range(4)], progress=False)
    model.eval()
    path = export_onnx(model, tmp_path / "s.onnx", torch.randn(1, 1, 10, 10), weight_dtype="int8")
    assert _weight_dtypes(path) == {"int8"}
    x = torch.randn(7, 1, 10, 10)
    with torch.no_grad():
        expected = model(x)
    # compared unfused: fused u8s8 kernels saturate on CPUs without VNNI (see export_onnx)
    got = run_onnx(path, x, optimize=False)
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()))


def test_unknown_weight_dtype_is_rejected(tmp_path):
    with pytest.raises(qd.ConfigError, match="weight_dtype"):
        export_onnx(_net(), tmp_path / "x.onnx", torch.randn(1, 1, 10, 10), weight_dtype="u4")


def test_low_bit_formats_export_as_their_float_values(tmp_path):
    model = qd.quantize_(_net(), qd.QuantConfig(weights=qd.TernaryFormat(axis=0)))
    model.eval()
    path = export_onnx(model, tmp_path / "t.onnx", torch.randn(1, 1, 10, 10))
    x = torch.randn(3, 1, 10, 10)
    with torch.no_grad():
        assert torch.allclose(run_onnx(path, x), model(x), atol=1e-5)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


@pytest.mark.parametrize(
    "weights",
    [
        qd.IntFormat(4, group_size=32),
        qd.IntFormat(4, symmetric=False, group_size=32),
        qd.IntFormat(4, axis=0),
    ],
    ids=str,
)
def test_int4_weights_export_as_uint4_dequantize_linear(tmp_path, weights):
    model = qd.quantize_(_mlp(), qd.QuantConfig(weights=weights)).eval()
    packed = qd.load(qd.save(model, tmp_path / "m.qd.safetensors"), model=_mlp())
    path = export_onnx(packed, tmp_path / "m.onnx")  # example input from the first Linear
    proto = onnx.load(str(path))
    assert any(i.version >= 21 for i in proto.opset_import if i.domain in ("", "ai.onnx"))
    uint4 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT4]
    assert len(uint4) >= 4  # codes and zero points of both layers
    assert [n.op_type for n in proto.graph.node].count("DequantizeLinear") >= 2
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    # same codes and scales; onnxruntime sums in its own order
    assert torch.allclose(run_onnx(path, x), expected, atol=1e-5 * float(expected.abs().max()))


def test_per_token_int8_activations_are_reproduced(tmp_path):
    row8 = qd.IntFormat(8, axis="row")
    model = qd.quantize_(
        _mlp(), qd.QuantConfig(weights=qd.IntFormat(8, axis=0), activations=row8)
    ).eval()
    path = export_onnx(model, tmp_path / "w8a8.onnx")
    x = torch.randn(6, 64) * 3
    with torch.no_grad():
        expected = model(x)
    got = run_onnx(path, x)
    # the same rounding in ONNX ops; a tie rounded the other way moves one code by one
    assert torch.allclose(got, expected, atol=1e-3 * float(expected.abs().max()))


def test_int8_weights_are_stored_as_one_byte_codes(tmp_path):
    def big():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))

    fp = export_onnx(big(), tmp_path / "fp.onnx", torch.randn(1, 256))
    model = qd.quantize_(big(), qd.QuantConfig(weights=qd.IntFormat(8, axis=0))).eval()
    q = export_onnx(model, tmp_path / "q.onnx", torch.randn(1, 256))
    assert _weight_dtypes(q) == {"uint8"}
    assert q.stat().st_size < 0.3 * fp.stat().st_size
    x = torch.randn(5, 256)
    with torch.no_grad():
        assert torch.allclose(run_onnx(q, x), model(x), atol=1e-5)
