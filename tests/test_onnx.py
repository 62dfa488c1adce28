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


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


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
    assert ops.count("QuantizeLinear") >= 6 and ops.count("DequantizeLinear") >= 6
    x = torch.randn(7, 1, 10, 10)
    with torch.no_grad():
        expected = model(x)
    got = run_onnx(path, x)
    # same codes; onnxruntime may round ties in its own order: a few LSBs of the outputs
    assert torch.allclose(got, expected, atol=2e-3 * float(expected.abs().max()))


def test_low_bit_formats_export_as_their_float_values(tmp_path):
    model = qd.quantize_(_net(), qd.QuantConfig(weights=qd.TernaryFormat(axis=0)))
    model.eval()
    path = export_onnx(model, tmp_path / "t.onnx", torch.randn(1, 1, 10, 10))
    x = torch.randn(3, 1, 10, 10)
    with torch.no_grad():
        assert torch.allclose(run_onnx(path, x), model(x), atol=1e-5)
