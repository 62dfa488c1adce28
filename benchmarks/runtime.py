"""Packed low-bit inference against fp32 on this CPU, side by side in one process.

For each model, the float model and its packed variants (saved with ``qd.save`` and loaded back
with ``qd.load``, as a user would) run on the same input with interleaved repetitions (median
of 30), at batch 1 and 32, on 2 threads:

* ``fp32``: ``nn.Linear`` / ``nn.Conv2d`` (PyTorch's own kernels, oneDNN/MKL);
* ``int8``: W8A8, per-channel int8 weights, per-token int8 activations (our C kernel; on CPUs
  with VNNI, torch._int_mm on the same codes from batch 32);
* ``int8-wo``: int8 weights only, fp32 activations (C kernel);
* ``int4``: W4A8, 4-bit weights with a scale per group of 64, per-token int8 activations;
* ``int4-wo``: W4A16 style, 4-bit weights with a scale per group of 64, fp32 activations
  (table-lookup C kernel on the file's own layout);
* ``ternary``: W1.58A8 as BitNet b1.58 (absmean ternary weights, per-token int8 activations);
* ``int2``: 2-bit integer weights per channel, per-token int8 activations (same kernel);
* ``ternary-portable``: the ternary file through the portable path (unpack + float matmul), to
  show what the kernel is worth;
* ``fp32-compile``: the float model under ``torch.compile`` (inductor), reported apart from
  eager fp32, which stays the baseline of every ratio;
* ``onnx-int8``: the W8A8 model exported with ``qd.export_onnx`` (uint8 weight codes, the
  per-token input rounding in plain ONNX ops) in an onnxruntime session on 2 threads: what a
  user who deploys our export gets (onnxruntime has no fused kernel for per-token int8 inputs);
* ``ort-dynamic``: onnxruntime's own ``quantize_dynamic`` on the fp32 export (int8 weights,
  per-tensor dynamic uint8 inputs, MatMulInteger / ConvInteger): the off-the-shelf int8
  runtime, side by side (its numbers are not ours: per-tensor, not per-token, inputs).

Conv2d layers read their codes one tile of output channels at a time (``qdistill.pack.conv``:
one C call dequantizes the tile, then PyTorch's float convolution), and W8A8 convolutions round
their inputs in C.

``bytes`` is the packed file's size on disk, ``peak_rss_mb`` the growth of the process's
resident memory when that model is loaded and run once, ``fraction_of_bound`` the lower-bound
latency (weight bytes read / measured memory bandwidth) divided by the measured latency.

    python benchmarks/runtime.py          # ~6 min; writes benchmarks/results/runtime.csv
    python benchmarks/runtime.py --models fmnist-teacher-cnn --out /tmp/rt   # one model
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import qdistill as qd
from qdistill.models import build_model
from qdistill.pack.kernels import cpu_path
from qdistill.pack.modules import use_portable_path
from qdistill.report import markdown_table, plot_grouped_bars, read_csv, write_csv
from qdistill.report.runtime import bench, memory_bandwidth_gbs

RESULTS = Path(__file__).parent / "results"
ROW8 = qd.IntFormat(8, axis="row")
VARIANTS = {
    "int8": qd.QuantConfig(weights=qd.IntFormat(8, axis=0), activations=ROW8),
    "int8-wo": qd.QuantConfig(weights=qd.IntFormat(8, axis=0)),
    "int4": qd.QuantConfig(weights=qd.IntFormat(4, group_size=64), activations=ROW8),
    "int4-wo": qd.QuantConfig(weights=qd.IntFormat(4, group_size=64)),
    "ternary": qd.QuantConfig(weights=qd.TernaryFormat(axis=0), activations=ROW8),
    "int2": qd.QuantConfig(weights=qd.IntFormat(2, axis=0), activations=ROW8),
}


class OrtModule(nn.Module):
    """An onnxruntime session behind ``nn.Module``'s call, so that it runs in the same loop."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        # its worker threads otherwise spin after each run, stealing the 2 cores from the
        # variant timed next in the interleaved loop (that slowed every variant 2-5x here)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.weight_nbytes = os.path.getsize(path)  # initializers: codes, scales, float rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


def ort_dynamic(reference: nn.Module, path: Path) -> Path:
    """The fp32 model exported, then int8-quantized by onnxruntime's own quantize_dynamic."""
    from onnxruntime.quantization import quantize_dynamic

    fp32 = qd.export_onnx(reference, path.with_suffix(".fp32.onnx"))
    quantize_dynamic(str(fp32), str(path))
    return path


def compiled(factory, reference: nn.Module):
    """The float model under torch.compile, or None where inductor cannot build here."""

    def build() -> nn.Module:
        model = factory().eval()
        model.load_state_dict(reference.state_dict())
        return torch.compile(model)

    try:
        with torch.no_grad():
            build()(torch.randn(1, *MODELS_SHAPES[factory]))
    except Exception as err:  # noqa: BLE001 - inductor needs a C++ toolchain; report, go on
        print(f"torch.compile unavailable here ({type(err).__name__}: {err}); row skipped")
        return None
    return build


def linear_heavy() -> nn.Module:
    """151 MB of fp32 weights: two 4096x4096 layers and one 1024x4096."""
    return nn.Sequential(
        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024)
    )


class MiniLMBlock(nn.Module):
    """The linear layers of one MiniLM-sized transformer block (hidden 384, FFN 1536)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(384, 384) for _ in range(4))
        self.up, self.down = nn.Linear(384, 1536), nn.Linear(1536, 384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # tokens [n, 384]; attention omitted
        h = self.o(self.q(x) + self.k(x) + self.v(x))
        return self.down(torch.nn.functional.gelu(self.up(h)))


def teacher_cnn() -> nn.Module:
    return build_model("teacher-cnn")


MODELS = {
    "linear-heavy-151MB": (linear_heavy, (4096,)),
    "minilm-block": (MiniLMBlock, (384,)),
    "fmnist-teacher-cnn": (teacher_cnn, (1, 28, 28)),
}
MODELS_SHAPES = {factory: shape for factory, shape in MODELS.values()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--redraw", default=None, help="only rewrite .md/.png from this CSV")
    args = parser.parse_args()
    if args.redraw:
        old_md = Path(args.out) / "runtime.md"  # keep the measured bandwidth line
        header = old_md.read_text().splitlines()[0] if old_md.exists() else args.redraw
        write_report(read_csv(args.redraw), Path(args.out), header)
        return
    torch.set_num_threads(2)
    bandwidth = memory_bandwidth_gbs()
    print(f"measured read bandwidth: {bandwidth:.1f} GB/s; kernels: {cpu_path()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            factory, shape = MODELS[model_name]
            torch.manual_seed(0)
            reference = factory().eval()
            files = {"fp32": qd.save(reference, Path(tmp) / f"{model_name}-fp32.qd.safetensors")}
            for name, config in VARIANTS.items():
                quantized = qd.quantize_(
                    factory(),
                    config,
                )
                quantized.load_state_dict(reference.state_dict(), strict=False)
                files[name] = qd.save(
                    quantized.eval(), Path(tmp) / f"{model_name}-{name}.qd.safetensors"
                )
                del quantized

            def loader(path: Path, portable: bool = False, factory=factory):
                def build() -> nn.Module:
                    model = qd.load(path, model=factory())
                    return use_portable_path(model) if portable else model

                return build

            variants = {name: loader(path) for name, path in files.items()}
            variants["ternary-portable"] = loader(files["ternary"], portable=True)
            sizes = {name: os.path.getsize(p) for name, p in files.items()}
            sizes["ternary-portable"] = sizes["ternary"]
            compiled_build = compiled(factory, reference)
            if compiled_build is not None:
                variants["fp32-compile"], sizes["fp32-compile"] = compiled_build, sizes["fp32"]
            onnx_path = qd.export_onnx(
                qd.load(files["int8"], model=factory()), Path(tmp) / f"{model_name}-int8.onnx"
            )
            variants["onnx-int8"] = lambda p=onnx_path: OrtModule(p)
            sizes["onnx-int8"] = os.path.getsize(onnx_path)
            ort_path = ort_dynamic(reference, Path(tmp) / f"{model_name}-ort.onnx")
            variants["ort-dynamic"] = lambda p=ort_path: OrtModule(p)
            sizes["ort-dynamic"] = os.path.getsize(ort_path)
            got = bench(
                variants,
                shape,
                reps=args.reps,
                file_bytes=sizes,
                bandwidth=bandwidth,
                model_name=model_name,
            )
            rows += got
            print(markdown_table(got), flush=True)
    write_csv(rows, Path(args.out) / "runtime.csv", columns=COLUMNS)
    header = (
        f"measured read bandwidth {bandwidth:.1f} GB/s; 2 threads; kernels: {cpu_path()}; "
        f"median of {args.reps} interleaved repetitions"
    )
    write_report(rows, Path(args.out), header)


COLUMNS = [
    "model",
    "variant",
    "batch",
    "latency_ms",
    "speedup_vs_fp32",
    "bytes",
    "peak_rss_mb",
    "fraction_of_bound",
]


def speedup_pivot(rows: list[dict]) -> list[dict]:
    """One row per variant, one column per (model, batch): its speedup over eager fp32."""
    table: dict[str, dict] = {}
    for r in rows:
        entry = table.setdefault(r["variant"], {"variant": r["variant"]})
        entry[f"{r['model']} b{r['batch']}"] = r["speedup_vs_fp32"]
    return list(table.values())


def write_report(rows: list[dict], out: Path, header: str) -> None:
    """runtime.md (the speedups at a glance, then every row) and runtime.png."""
    (out / "runtime.md").write_text(
        f"{header}\n\nspeedup over eager fp32:\n\n{markdown_table(speedup_pivot(rows))}\n\n"
        f"{markdown_table(rows, columns=COLUMNS)}\n"
    )
    bars = [
        {**r, "model_batch": f"{r['model']} b{r['batch']}"} for r in rows if r["variant"] != "fp32"
    ]
    plot_grouped_bars(
        bars,
        out / "runtime.png",
        group="model_batch",
        series="variant",
        value="speedup_vs_fp32",
        reference={"fp32 (eager)": 1.0},
        title=header.split(";")[0] + f"; kernels: {cpu_path()}",
    )


if __name__ == "__main__":
    main()
