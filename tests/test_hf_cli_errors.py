"""Bad input on the command line: a packed file whose header names a model class transformers
cannot build is one line on stderr and exit 2 (``qdistill eval`` / ``info``), no traceback."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qdistill as qd
from qdistill.cli import main

transformers = pytest.importorskip("transformers")
from tiny_transformers import llama_config  # noqa: E402


def _file_naming(name: str, path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(transformers, vocab_size=32)).eval()
    cfg = qd.QuantConfig(weights=qd.int4(group_size=32), unsupported="ignore")
    path = qd.save(qd.quantize_(model, cfg), path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["qdistill"])
    header["architecture"]["transformers"]["class"] = name
    header.pop("header_crc32")  # an edited header without its CRC: the class check is reached
    save_file(load_file(path), str(path), metadata={"qdistill": json.dumps(header)})
    return path


@pytest.mark.parametrize("name", ["NotAModel", "os.system"])
def test_eval_of_a_file_naming_an_unbuildable_class_is_one_line_exit_2(name, tmp_path, capsys):
    path = _file_naming(name, tmp_path / "m.qd.safetensors")
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert f"model class '{name}'" in err and "qd.load(path, model=" in err
