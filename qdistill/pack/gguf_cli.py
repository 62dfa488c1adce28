"""``qdistill export-gguf FILE OUT.gguf``: a packed Llama student as a llama.cpp GGUF file.

FILE is a packed model written by ``qd.save`` (or ``save_pretrained``'s single-file form) of a
transformers ``LlamaForCausalLM``; OUT.gguf is written atomically by
:func:`qdistill.pack.gguf_export.export_gguf`. ``--tokenizer`` names the tokenizer to embed: an
offline model name (``smollm2``), a folder, or a hub id already in the local cache.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``export-gguf`` subcommand's arguments."""
    from qdistill.cli import new_file

    p = subparsers.add_parser(
        "export-gguf",
        help="write a packed Llama-architecture model as a GGUF file for llama.cpp",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("file", help="a packed LlamaForCausalLM written by qd.save")
    p.add_argument("out", type=new_file, help="the .gguf file to write")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to embed: offline name (smollm2), folder or cached hub id (default: none)",
    )
    p.add_argument(
        "--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name, if not detected"
    )
    p.add_argument(
        "--float-type", choices=("f32", "f16"), default="f32", help="float weights' GGUF type"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Load FILE, export it, print what was written (errors: one line, exit 2, no file)."""
    from qdistill.pack import load
    from qdistill.pack.gguf_export import export_gguf

    model = load(args.file)
    tokenizer = None
    if args.tokenizer:
        from qdistill.models.hf import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    result = export_gguf(
        model,
        args.out,
        tokenizer,
        float_type=args.float_type,
        tokenizer_pre=args.tokenizer_pre,
    )
    for note in result.notes:
        print(f"note: {note}")
    print(result.summary())
    return 0
