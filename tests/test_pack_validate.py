"""The loader refuses inconsistent files (issue 12, items 3-5): each edit below used to load and
compute a wrong answer, raise a raw exception or allocate gigabytes; now each is one
FileFormatError naming the key or tensor, and the model passed in is left unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qdistill as qd
from qdistill.errors import FileFormatError
from qdistill.models import build_model
from qdistill.pack import PackedLinear, read_header, validate
from qdistill.pack.bits import pack_for


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_features=8, hidden=[6], num_classes=4)


def packed_file(tmp_path: Path, fmt, name: str = "m", entropy: str | None = None, model=None):
    model = qd.quantize_(model or mlp(), qd.QuantConfig(weights=fmt))
    return qd.save(model, tmp_path / f"{name}.qd.safetensors", entropy_coding=entropy)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["qdistill"])
    return tensors, header


def write(path: Path, tensors, header, rechecksum: bool = True) -> Path:
    """Write an edited file; the checksums are recomputed so the edit itself is what is tested."""
    if rechecksum and "checksums" in header:
        header["checksums"] = {k: validate.tensor_checksum(t) for k, t in tensors.items()}
    if rechecksum and validate.HEADER_CRC_KEY in header:
        header = validate.seal(header)
    out = path.with_name("edited.qd.safetensors")
    save_file(tensors, str(out), metadata={"qdistill": json.dumps(header)})
    return out


def refused(path: Path, match: str, model: nn.Module | None = None) -> None:
    model = mlp() if model is None else model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(FileFormatError, match=match):
        qd.load(path, model=model)
    # all or nothing: a refused file leaves the given model exactly as it was
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_clean_file_round_trips_and_records_checksums(tmp_path):
    path = packed_file(tmp_path, qd.int4(symmetric=False, axis=0))
    tensors, header = read(path)
    assert set(header["checksums"]) == set(tensors)
    loaded = qd.load(path, model=mlp())
    x = torch.randn(5, 8)
    ref = qd.quantize_(mlp(), qd.QuantConfig(weights=qd.int4(symmetric=False, axis=0))).eval()
    assert torch.allclose(loaded(x), ref(x), atol=1e-5)


def test_deleted_or_wrong_length_bias(tmp_path):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    del tensors["classifier.bias"]
    refused(write(path, tensors, header), r"'classifier\.bias' is missing")
    tensors, header = read(path)
    tensors["classifier.bias"] = torch.zeros(7)
    refused(write(path, tensors, header), r"'classifier\.bias' is torch.float32 \(7,\)")


def test_deleted_zero_point_and_flipped_symmetric(tmp_path):
    path = packed_file(tmp_path, qd.int4(symmetric=False, axis=0))
    tensors, header = read(path)
    del tensors["body.1.weight_zero_point"]
    refused(write(path, tensors, header), r"'body\.1\.weight_zero_point' is missing")
    tensors, header = read(path)
    header["layers"]["body.1"]["format"]["symmetric"] = True
    refused(write(path, tensors, header), r"weight_zero_point' is present")
    sym = packed_file(tmp_path, qd.int4(axis=0), name="sym")
    tensors, header = read(sym)
    header["layers"]["body.1"]["format"]["symmetric"] = False
    refused(write(sym, tensors, header), r"weight_zero_point' is missing")


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_scale_zero_negative_nan_inf(tmp_path, value):
    path = packed_file(tmp_path, qd.int8(axis=0))
    tensors, header = read(path)
    tensors["body.1.weight_scale"][2] = value
    refused(write(path, tensors, header), r"'body\.1\.weight_scale' holds .*finite and > 0")


def test_zero_point_out_of_range_for_the_bit_width(tmp_path):
    path = packed_file(tmp_path, qd.int4(symmetric=False, axis=0))
    tensors, header = read(path)
    tensors["body.1.weight_zero_point"][0] = 200
    refused(write(path, tensors, header), r"weight_zero_point' holds 200.*0\.\.15")


@pytest.mark.parametrize("packing", ["2bit", "trits"])
def test_ternary_code_3_is_refused(tmp_path, packing):
    fmt = qd.formats.TernaryFormat(axis=0, packing=packing)
    path = packed_file(tmp_path, fmt)
    tensors, header = read(path)
    codes = torch.ones(6 * 8, dtype=torch.uint8)
    if packing == "2bit":
        codes[5] = 3
        tensors["body.1.weight_codes"] = pack_for(codes, fmt)
        match = r"holds code 3 at weight 5"
    else:
        tensors["body.1.weight_codes"] = pack_for(codes, fmt)
        tensors["body.1.weight_codes"][1] = 250
        match = r"byte > 242"
    refused(write(path, tensors, header), match)


def test_codebook_index_past_the_last_point(tmp_path):
    fmt = qd.formats.CodebookFormat(points=(-0.5, 0.0, 0.5))  # 3 points, 2-bit codes
    path = packed_file(tmp_path, fmt)
    tensors, header = read(path)
    tensors["body.1.weight_codes"] = pack_for(torch.full((48,), 3, dtype=torch.uint8), fmt)
    refused(write(path, tensors, header), r"code 3 .* codes are 0\.\.2")


def huffman_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=128, hidden=[64], num_classes=4)
    with torch.no_grad():
        model.body[1].weight.normal_()  # bell-shaped codes: Huffman beats 8 bits a code
    return model


def huffman_file(tmp_path: Path) -> Path:
    model = huffman_model()
    path = packed_file(tmp_path, qd.int8(), entropy="huffman", model=model)
    assert "entropy" in read(path)[1]["layers"]["body.1"]
    return path


def test_huffman_kraft_sum_and_memory_bomb_lengths(tmp_path):
    path = huffman_file(tmp_path)
    ref = qd.quantize_(huffman_model(), qd.QuantConfig(weights=qd.int8())).eval()
    loaded = qd.load(path, model=huffman_model())
    assert isinstance(loaded.body[1], PackedLinear)
    x = torch.randn(3, 128)
    assert torch.allclose(loaded(x), ref(x), atol=1e-4)
    tensors, header = read(path)
    header["layers"]["body.1"]["entropy"]["lengths"] = [1] * 16 + [0] * 240  # Kraft sum 8
    with pytest.raises(FileFormatError, match="Kraft"):
        qd.load(write(path, tensors, header), model=huffman_model())
    tensors, header = read(path)
    header["layers"]["body.1"]["entropy"]["lengths"] = [30] * 16 + [0] * 240  # 8 GiB table
    with pytest.raises(FileFormatError, match=r"lengths.*0\.\.16"):
        read_header(write(path, tensors, header))


def test_huffman_decoder_checks_its_own_inputs():
    from qdistill.pack import huffman

    stream = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(FileFormatError, match="Kraft"):
        huffman.decode(stream, [1, 1, 1, 1], 8)
    with pytest.raises(FileFormatError, match="0..16"):
        huffman.decode(stream, [30, 30], 8)
    with pytest.raises(FileFormatError, match="cannot fit"):
        huffman.decode(stream, [1, 1], 33)  # 33 codes of >= 1 bit in 32 bits


@pytest.mark.parametrize("target", ["identity", "folded_bn"])
def test_header_may_not_replace_a_relu(tmp_path, target):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    if target == "identity":
        header["identity"] = ["body.2"]  # the ReLU
    else:
        header["layers"]["body.1"]["folded_bn"] = "body.2"
    refused(write(path, tensors, header), r"names a ReLU; only a BatchNorm")


def test_a_packed_layer_may_only_replace_its_own_kind(tmp_path):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    header["layers"]["body.1"]["embedding"] = {"padding_idx": None}
    refused(write(path, tensors, header), r"packed embedding but the model has a Linear")


@pytest.mark.parametrize("version", [1.9, "1", 0, -1, True, None])
def test_format_version_is_an_exact_supported_integer(tmp_path, version):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    header["format_version"] = version
    refused(write(path, tensors, header), "format_version")


def test_unknown_layout_and_unknown_layer_key(tmp_path):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    header["layers"]["body.1"]["layout"] = "msb"
    refused(write(path, tensors, header), r"layout 'msb' is unknown")
    tensors, header = read(path)
    header["layers"]["body.1"]["transposed"] = True
    refused(write(path, tensors, header), r"unknown keys \['transposed'\]")


def test_a_flipped_bit_in_tensor_data_fails_the_checksum(tmp_path):
    path = packed_file(tmp_path, qd.int8())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # the last tensor's data, flipped in place
    path.write_bytes(bytes(data))
    refused(path, "CRC-32")


def test_files_without_checksums_still_load(tmp_path):
    model = qd.quantize_(mlp(), qd.QuantConfig(weights=qd.int8()))
    path = qd.save(model, tmp_path / "m.qd.safetensors", checksum=False)
    assert "checksums" not in read(path)[1]
    qd.load(path, model=mlp())


def test_conv_groups_zero_is_refused(tmp_path):
    torch.manual_seed(0)
    model = build_model("student-cnn", width=4, input_size=8)
    path = packed_file(tmp_path, qd.int8(axis=0), model=model)
    tensors, header = read(path)
    header["layers"]["features.0"]["conv"]["groups"] = 0
    with pytest.raises(FileFormatError, match=r"conv\.groups"):
        qd.load(write(path, tensors, header))


@pytest.mark.parametrize(
    "kwargs",
    [{"hidden": [10000] * 1000}, {"num_classes": 10**12}, {"hidden": ["x"]}, {"num_classes": -4}],
)
def test_architecture_sizes_are_capped_by_the_file_size(tmp_path, kwargs):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    header["architecture"]["kwargs"].update(kwargs)
    with pytest.raises(FileFormatError, match="architecture"):
        qd.load(write(path, tensors, header))


def test_deeply_nested_json_header_is_one_clean_error(tmp_path):
    path = tmp_path / "deep.qd.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"qdistill": "[" * 100_000})
    with pytest.raises(FileFormatError, match="not JSON"):
        read_header(path)


def test_size_error_names_the_real_tensor(tmp_path):
    path = packed_file(tmp_path, qd.int8(axis=0))
    tensors, header = read(path)
    tensors["body.1.weight_scale"] = torch.ones(5)
    refused(write(path, tensors, header), r"'body\.1\.weight_scale' is torch.float32 \(5,\)")


def test_a_header_edit_that_still_parses_fails_the_header_checksum(tmp_path):
    fmt = qd.formats.CodebookFormat(points=(-0.5, 0.0, 0.5))
    path = packed_file(tmp_path, fmt)
    tensors, header = read(path)
    header["layers"]["body.1"]["format"]["points"][2] = 0.25  # a valid, different codebook
    refused(write(path, tensors, header, rechecksum=False), "header_crc32")
    loaded = qd.load(write(path, tensors, header), model=mlp())  # resealed: a consistent file
    assert loaded.body[1].weight_format.points[2] == 0.25


def test_stochastic_rounding_in_a_packed_weight_format_is_refused(tmp_path):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    header["layers"]["body.1"]["format"]["stochastic"] = True
    refused(write(path, tensors, header), r"format\.stochastic is true")


def test_huffman_symbol_without_a_ternary_code_is_a_file_format_error(tmp_path):
    from qdistill.pack import huffman

    fmt = qd.formats.TernaryFormat(axis=0, packing="trits")
    path = packed_file(tmp_path, fmt)
    tensors, header = read(path)
    codes = torch.full((48,), 3, dtype=torch.uint8)  # symbol 3: no ternary value
    stream, lengths = huffman.encode(codes, 4)
    tensors["body.1.weight_codes"] = stream
    header["layers"]["body.1"]["entropy"] = {"kind": "huffman", "lengths": lengths}
    refused(write(path, tensors, header), r"ternary code \(3\)")


def test_architecture_kwargs_are_capped_before_building(tmp_path):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    header["architecture"]["kwargs"]["hidden"] = [1] * 40_000  # 40,000 Linear modules
    with pytest.raises(FileFormatError, match="bytes of kwargs"):
        qd.load(write(path, tensors, header))


@pytest.mark.parametrize("where", ["format", "activations"])
def test_a_group_size_beyond_the_layer_is_refused(tmp_path, where):
    path = packed_file(tmp_path, qd.int8())
    tensors, header = read(path)
    header["layers"]["classifier"][where] = {**header["layers"]["classifier"]["format"]}
    header["layers"]["classifier"][where]["group_size"] = 10**12  # padded: a 4 TB bucket
    refused(write(path, tensors, header), rf"'classifier' {where}\.group_size")
    small = qd.quantize_(mlp(), qd.QuantConfig(weights=qd.int8(group_size=256)))  # 24 weights
    qd.load(qd.save(small, tmp_path / "small.qd.safetensors"), model=mlp())  # still fine


def test_activation_axis_and_static_scale_must_fit_the_input(tmp_path):
    model = qd.quantize_(mlp(), qd.QuantConfig(weights=qd.int8(), activations=qd.int8()))
    qd.calibrate(model, [torch.randn(16, 8) for _ in range(2)])  # static per-tensor ranges
    path = qd.save(model, tmp_path / "w8a8.qd.safetensors")
    loaded = qd.load(path, model=mlp())
    assert loaded.body[1].act_scale.numel() == 1
    tensors, header = read(path)
    header["layers"]["classifier"]["activations"]["axis"] = 3  # a Linear's input has no axis 3
    refused(write(path, tensors, header), r"activations\.axis 3 is not an input axis")
    tensors, header = read(path)
    tensors["classifier.act_scale"] = torch.ones(5)  # per-tensor format, 5 scales
    refused(write(path, tensors, header), r"'classifier\.act_scale' is torch.float32 \(5,\)")
