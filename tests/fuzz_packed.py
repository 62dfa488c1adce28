"""Mutation fuzzing of packed files (issue 12): seeded edits of small valid files, each loaded
and run; every case must either load (and compute) or raise FileFormatError.

Used three ways:

* ``tests/test_pack_fuzz.py`` runs a few hundred seeded cases in a worker subprocess (a crash or
  hang of one case is recorded and the worker restarts after it);
* ``python tests/fuzz_packed.py --cases 5000`` runs more and prints the counts;
* ``tests/fuzz_atheris.py`` (``make fuzz``) lets atheris drive the same mutations for hours.

Mutations: bit flips anywhere in the file, truncation, edits of the JSON header (a key
deleted, a value replaced by another type, a number changed, memory-bomb sizes) and edits of the
tensors (deleted, resized, retyped, one element set to 0 / -1 / NaN / 255), the latter with the
checksums recomputed half the time so that the validation behind the CRC is reached too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

CASE_TIMEOUT_S = 20
MEMORY_CAP = 6 << 30  # address space of the worker: a memory bomb fails instead of swapping

_JUNK: list[Any] = [
    0, -1, 1, 2, 3, 255, 256, 1.5, -0.0, 1e308, 10**12, 2**63, "", "x", "1", "row", "huffman",
    "msb", None, True, False, [], {}, [0], [-1, 2], [30] * 16, [10000] * 1000, {"kind": "int"},
    {"kind": "huffman", "lengths": [1] * 256}, [[[[[]]]]],
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# seed files
# --------------------------------------------------------------------------------------------


def make_seeds(folder: Path) -> list[dict[str, Any]]:
    """Write the seed files and the reference output of each; returns the manifest."""
    import torch

    import qdistill as qd
    from qdistill.formats import CodebookFormat, FPFormat, TernaryFormat
    from qdistill.models import build_model

    def mlp(n_in: int = 12, hidden: int = 10) -> Any:
        return build_model("mlp", in_features=n_in, hidden=[hidden], num_classes=4)

    specs: list[tuple[str, Any, Any, tuple[int, ...], dict[str, Any]]] = [
        ("int4-asym-g16", mlp, qd.int4(symmetric=False, group_size=16), (3, 12), {}),
        ("ternary-trits", mlp, TernaryFormat(axis=0, packing="trits"), (3, 12), {}),
        ("ternary-2bit-w8a8", mlp, TernaryFormat(axis=0), (3, 12), {"act": True}),
        ("codebook3", mlp, CodebookFormat(points=(-0.3, 0.0, 0.3)), (3, 12), {}),
        ("fp-e4m3-g8", mlp, FPFormat("e4m3", group_size=8), (3, 12), {}),
        ("int8-huffman", lambda: mlp(64, 48), qd.int8(), (3, 64), {"huffman": True}),
        ("cnn-int8-bnfold", None, qd.int8(axis=0), (2, 1, 8, 8), {"cnn": True}),
    ]
    manifest = []
    for name, factory, fmt, shape, opts in specs:
        torch.manual_seed(0)
        if opts.get("cnn"):
            model = build_model("student-cnn", width=4, input_size=8, batchnorm=True)
            qd.fold_batchnorm(model)
        else:
            model = factory()
        if opts.get("huffman"):
            with torch.no_grad():
                model.body[1].weight.normal_()
        act = qd.int8(axis="row") if opts.get("act") else None
        qd.quantize_(model, qd.QuantConfig(weights=fmt, activations=act))
        model.eval()
        path = folder / f"{name}.qd.safetensors"
        qd.save(model, path, entropy_coding="huffman" if opts.get("huffman") else None)
        torch.manual_seed(1)
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = qd.load(path)(x)
        torch.save({"x": x, "ref": ref}, folder / f"{name}.ref.pt")
        manifest.append({"name": name, "file": str(path), "ref": str(folder / f"{name}.ref.pt")})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


# --------------------------------------------------------------------------------------------
# mutations (pure functions of the seed and the bytes)
# --------------------------------------------------------------------------------------------


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(safetensors JSON index, tensor bytes) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_file(index: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(index, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested JSON value (dict keys and list indices)."""
    out = [prefix]
    if len(prefix) > 12:  # a nested list from an earlier edit: do not walk into it
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list) and len(value) <= 64:
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _edit_json(rng: random.Random, doc: Any) -> Any:
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return rng.choice(_JUNK)
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key, old = path[-1], parent[path[-1]]
    op = rng.random()
    if op < 0.2 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.45 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = rng.choice([old + 1, old - 1, -old, old * 1000, old / 2, 0])
    elif op < 0.55 and isinstance(old, bool):
        parent[key] = not old
    elif op < 0.6:
        nested: Any = 0
        for _ in range(rng.choice([10, 200, 5000])):
            nested = [nested]
        parent[key] = nested
    else:
        parent[key] = rng.choice(_JUNK)
    return doc


def _tensor_bytes(info: dict[str, Any]) -> int:
    return info["data_offsets"][1] - info["data_offsets"][0]


def _edit_tensors(rng: random.Random, data: bytes) -> bytes:
    """Edit one tensor (deleted, resized, retyped, an element changed); recompute the CRCs half
    the time."""
    import torch
    from safetensors.torch import load, save

    from qdistill.pack import validate

    tensors = load(data)
    index, _ = split_file(data)
    meta = index.get("__metadata__", {})
    if not tensors:
        return data
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    op = rng.randrange(6)
    if op == 0:
        del tensors[key]
    elif op == 1:
        flat = t.reshape(-1)
        tensors[key] = flat[: max(0, flat.numel() - rng.randint(1, 3))].clone()
    elif op == 2:
        tensors[key] = torch.cat([t.reshape(-1), t.reshape(-1)[:3]])
    elif op == 3:
        tensors[key] = t.to(rng.choice([torch.float32, torch.int32, torch.uint8, torch.float16]))
    elif t.numel():
        t = t.clone()
        i = rng.randrange(t.numel())
        v = rng.choice([0, -1, float("nan"), float("inf"), 255, 3, 200, 1e30])
        try:
            t.reshape(-1)[i] = v
        except (RuntimeError, OverflowError):
            t.reshape(-1)[i] = 0
        tensors[key] = t
    if rng.random() < 0.5 and "qdistill" in meta:
        try:
            header = json.loads(meta["qdistill"])
            header["checksums"] = {k: validate.tensor_checksum(v) for k, v in tensors.items()}
            meta = {**meta, "qdistill": json.dumps(validate.seal(header))}
        except (ValueError, TypeError, AttributeError):
            pass
    return save(tensors, metadata=meta)


def mutate(data: bytes, seed: int) -> bytes:
    """One seeded mutation of a packed file's bytes."""
    rng = random.Random(seed)
    kind = rng.choice(["flip", "flip", "truncate", "header", "header", "header", "tensor"])
    if kind == "flip":
        buf = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "tensor":
        return _edit_tensors(rng, data)
    index, body = split_file(data)
    meta = index.get("__metadata__", {})
    header = json.loads(meta["qdistill"])
    for _ in range(rng.choice([1, 1, 2, 3])):
        header = _edit_json(rng, header)
    if rng.random() < 0.7 and isinstance(header, dict):  # reach the checks behind the CRC
        from qdistill.pack import validate

        try:
            header = validate.seal(header)
        except (RecursionError, ValueError, TypeError):
            pass
    try:
        meta["qdistill"] = json.dumps(header)
    except (RecursionError, ValueError):
        meta["qdistill"] = "[" * 100_000
    index["__metadata__"] = meta
    return join_file(index, body)


# --------------------------------------------------------------------------------------------
# running cases
# --------------------------------------------------------------------------------------------


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


_REFS: dict[str, Any] = {}


def run_case(data: bytes, ref_path: str, workdir: Path) -> str:
    """Load mutated bytes and run the model: ``identical`` / ``different`` (loaded; output
    equal to the seed's or not), ``clean`` (FileFormatError) or ``other: <exception>``."""
    import torch

    from qdistill.errors import FileFormatError
    from qdistill.pack import load

    path = workdir / "case.qd.safetensors"
    path.write_bytes(data)
    if ref_path not in _REFS:
        _REFS[ref_path] = torch.load(ref_path)
    ref = _REFS[ref_path]
    try:
        signal.alarm(CASE_TIMEOUT_S)
        try:
            model = load(path)
            with torch.no_grad():
                y = model(ref["x"])
        finally:
            signal.alarm(0)
    except FileFormatError:
        return "clean"
    except _Timeout:
        return "other: hang"
    except Exception as exc:  # anything else is a bug the fuzzer reports
        return f"other: {type(exc).__name__}: {str(exc)[:200]}"
    if y.shape == ref["ref"].shape and torch.equal(y, ref["ref"]):
        return "identical"
    return "different"


def worker(manifest_path: str, start: int, stop: int, log: str) -> None:
    """Run cases ``start .. stop - 1``, appending ``{"case", "seed", "result"}`` lines to
    ``log`` (a ``{"case", "started"}`` line first, so a crash is attributed)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    signal.signal(signal.SIGALRM, _alarm)
    import torch

    torch.set_num_threads(1)
    manifest = json.loads(Path(manifest_path).read_text())
    seeds = [(Path(m["file"]).read_bytes(), m["ref"], m["name"]) for m in manifest]
    with tempfile.TemporaryDirectory() as tmp, open(log, "a") as out:
        for case in range(start, stop):
            data, ref, name = seeds[case % len(seeds)]
            out.write(json.dumps({"case": case, "started": True}) + "\n")
            out.flush()
            result = run_case(mutate(data, case), ref, Path(tmp))
            out.write(json.dumps({"case": case, "seed": name, "result": result}) + "\n")
            out.flush()


def run_cases(manifest: Path, cases: int, log: Path, timeout: float = 600) -> Counter:
    """Run ``cases`` mutations in worker subprocesses; a worker that dies (signal, memory) is
    recorded as ``crash`` for the case it was running and restarted after it."""
    results: dict[int, str] = {}
    start = 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while start < cases:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(manifest), str(start), str(cases), str(log)],
            env=env,
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        started = None
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "result" in rec:
                results[rec["case"]] = rec["result"]
            else:
                started = rec["case"]
        if proc.returncode != 0:
            if started is None or started in results:
                raise RuntimeError(f"fuzz worker failed: {proc.stderr[-2000:]}")
            results[started] = f"crash: exit {proc.returncode}"
            start = started + 1
        else:
            start = cases
    return Counter(results.values())


def summarise(counts: Counter) -> dict[str, int]:
    """``{"cases", "clean", "identical", "different", "other", "crash"}``."""
    out = {"cases": sum(counts.values())}
    for key in ("clean", "identical", "different"):
        out[key] = counts.get(key, 0)
    out["other"] = sum(n for k, n in counts.items() if k.startswith("other"))
    out["crash"] = sum(n for k, n in counts.items() if k.startswith("crash"))
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_seeds(folder)
        counts = run_cases(folder / "manifest.json", args.cases, folder / "log.jsonl")
    print(json.dumps(summarise(counts)))
    for key, n in counts.most_common():
        if not key.startswith(("clean", "identical", "different")):
            print(f"{n:5d}  {key}")


if __name__ == "__main__":
    main()
