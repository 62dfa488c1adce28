"""``qdistill``: the command line.

    qdistill demo [--quick]          the main job: quantized distillation vs baselines
    qdistill run recipe.yaml         any recipe from a YAML file (--resume after a kill)
    qdistill eval FILE --dataset D   accuracy of a packed model file
    qdistill info FILE               what a packed file holds
    qdistill bench FILE              latency of a packed file against its float twin
    qdistill plan FILE --budget 60KB per-layer bit widths under a size budget
    qdistill report RUN_DIR...       one HTML page: curves, Pareto plot, per-layer plan
    qdistill export-gguf FILE OUT.gguf  a packed Llama student as a GGUF file for llama.cpp

User mistakes print one line (``error: ...``) and exit with status 2; ``--debug`` shows the
traceback instead. Every argument is checked while the command line is parsed (types, ranges,
that folders exist), before any work starts and before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from collections.abc import Sequence

from qdistill.errors import QDistillError


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line on stderr, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def bit_width(text: str) -> int:
    """An integer bit width 2..8 (argparse type)."""
    value = positive_int(text)
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{value} bits: use 2..8")
    return value


def dataset_name(text: str) -> str:
    from qdistill.data import DATASETS

    if text not in DATASETS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dataset; use {sorted(DATASETS)}")
    return text


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder")
    return text


def new_file(text: str) -> str:
    """A file path that can be written: its folder exists and it is not a folder itself."""
    parent = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist; create it first")
    return text


def out_dir(text: str) -> str:
    """An output folder: may not exist yet (it is created after the checks), not a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file; name a folder")
    return text


def size_budget(text: str) -> str:
    from qdistill.recipes.mixed_precision import parse_size

    try:
        parse_size(text)
    except QDistillError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_common(p: argparse.ArgumentParser, threads: bool = True) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if threads:
        p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qdistill",
        description="Distillation and quantization together: low-bit students, truly packed.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    demo = sub.add_parser("demo", help="quantized distillation on Fashion-MNIST vs baselines")
    demo.add_argument(
        "--out", type=out_dir, default="runs/demo", help="output folder (default runs/demo)"
    )
    demo.add_argument("--quick", action="store_true", help="a few-minute run on a data subset")
    demo.add_argument(
        "--dataset", type=dataset_name, default="fashion-mnist", help="fashion-mnist or digits"
    )
    demo.add_argument(
        "--data-dir", type=existing_dir, default=None, help="folder with the dataset's files"
    )
    demo.add_argument("--bits", type=bit_width, nargs="+", default=None, help="bit widths (8 4 2)")
    demo.add_argument("--teacher-epochs", type=positive_int, default=None)
    demo.add_argument("--student-epochs", type=positive_int, default=None)
    demo.add_argument("--subset", type=positive_int, default=None, help="use the first N examples")
    demo.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="student seeds (default 0 1 2)"
    )
    demo.add_argument(
        "--workers", type=positive_int, default=None, help="student processes (default 2)"
    )
    demo.add_argument("--resume", action="store_true", help="continue a killed run")
    _add_common(demo)

    run = sub.add_parser("run", help="run a YAML recipe")
    run.add_argument("recipe", help="path of the recipe file")
    run.add_argument("--resume", action="store_true", help="continue a killed run")
    run.add_argument(
        "--allow-output-outside",
        action="store_true",
        help="let the recipe's output: lie outside the recipe file's folder",
    )
    run.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard")
    run.add_argument("--wandb", action="store_true", help="also log to W&B (offline mode)")
    run.add_argument(
        "--backend", choices=["gloo", "nccl"], default=None, help="under torchrun (default gloo)"
    )
    _add_common(run)

    ev = sub.add_parser("eval", help="accuracy of a packed model file")
    ev.add_argument("file")
    ev.add_argument("--dataset", type=dataset_name, default="fashion-mnist")
    ev.add_argument("--data-dir", type=existing_dir, default=None)
    _add_common(ev)

    plan = sub.add_parser("plan", help="per-layer bit widths under a size budget (ZeroQ)")
    plan.add_argument("model", help="a float model file written by qd.save (e.g. the demo's)")
    plan.add_argument(
        "--budget", type=size_budget, required=True, help="packed file size: 60KB, 1.5MB, 1GB"
    )
    plan.add_argument("--bits", type=bit_width, nargs="+", default=[2, 4, 8])
    plan.add_argument(
        "--dataset", type=dataset_name, default="fashion-mnist", help="gives the input shape"
    )
    plan.add_argument(
        "--real-data", action="store_true", help="measure on real data, not distilled"
    )
    plan.add_argument("--data-dir", type=existing_dir, default=None)
    plan.add_argument("--samples", type=positive_int, default=256, help="distilled samples")
    plan.add_argument(
        "--steps", type=positive_int, default=200, help="distillation steps per batch"
    )
    plan.add_argument(
        "--out", type=new_file, default="plan.yaml", help="where to write the QuantConfig (YAML)"
    )
    _add_common(plan)

    from qdistill.report.runtime import add_bench_parser

    _add_common(add_bench_parser(sub), threads=False)  # bench has its own --threads (2)

    from qdistill.report.html import add_report_parser

    _add_common(add_report_parser(sub))

    info = sub.add_parser("info", help="show what a packed file holds")
    info.add_argument("file")
    _add_common(info)

    from qdistill.pack import gguf_cli  # export-gguf: a packed Llama as a llama.cpp GGUF file

    _add_common(gguf_cli.add_parser(sub))
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    import pathlib

    from qdistill.demo import SUMMARY_COLUMNS, DemoConfig, run_demo, summarize
    from qdistill.report import markdown_table

    overrides = {
        k: v
        for k, v in {
            "out": args.out,
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "bits": tuple(args.bits) if args.bits else None,
            "teacher_epochs": args.teacher_epochs,
            "student_epochs": args.student_epochs,
            "subset": args.subset,
            "seeds": tuple(args.seeds) if args.seeds else None,
            "workers": args.workers,
            "resume": args.resume,
            "progress": not args.no_progress,
        }.items()
        if v is not None
    }
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    rows = run_demo(cfg)
    print(markdown_table(summarize(rows), columns=SUMMARY_COLUMNS))
    timing = json.loads((pathlib.Path(cfg.out) / "demo-timing.json").read_text())
    print(
        f"\nwrote {cfg.out}/demo.csv, demo.md and demo.png; {timing['wall_s']:.0f} s wall, "
        f"{timing['cpu_s']:.0f} s CPU, load average {timing['load_average_1_5_15min']}"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from qdistill.recipes.from_yaml import load_recipe, run_recipe
    from qdistill.recipes.session import with_overrides
    from qdistill.train.distributed import is_main

    config = load_recipe(args.recipe, allow_output_outside=args.allow_output_outside)
    config = with_overrides(
        config, tensorboard=args.tensorboard, wandb=args.wandb, backend=args.backend
    )
    metrics = run_recipe(config, resume=args.resume, progress=not args.no_progress)
    if is_main():  # under torchrun: one rank prints
        print(json.dumps(metrics, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from qdistill.data import make_loaders
    from qdistill.pack import load
    from qdistill.train import evaluate

    model = load(args.file)
    _, test_loader = make_loaders(args.dataset, data_dir=args.data_dir)
    acc = evaluate(model, test_loader)
    print(
        f"{args.file}: accuracy {100 * acc:.2f}% on {args.dataset} test, "
        f"{os.path.getsize(args.file)} bytes"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from qdistill.report.runtime import cmd_bench

    return cmd_bench(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from qdistill.report.html import cmd_report

    return cmd_report(args)


def _cmd_info(args: argparse.Namespace) -> int:
    from qdistill.pack import read_header

    header = read_header(args.file)
    print(
        f"{args.file}: qdistill file format {header['format_version']}, "
        f"{os.path.getsize(args.file)} bytes"
    )
    arch = header.get("architecture")
    print(f"architecture: {arch['name']} {arch.get('kwargs', {})}" if arch else "architecture: -")
    for name, meta in header.get("layers", {}).items():
        fmt = {k: v for k, v in meta["format"].items() if v not in (None, False)}
        print(f"  {name}: weight {tuple(meta['shape'])} {fmt}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    from qdistill.data import DATASETS, make_loaders
    from qdistill.pack import load
    from qdistill.recipes.mixed_precision import make_plan
    from qdistill.report import format_bytes

    model = load(args.model)
    data = None
    if args.real_data:
        train, _ = make_loaders(args.dataset, data_dir=args.data_dir, subset=args.samples)
        data = list(train)
    plan, config = make_plan(
        model,
        args.budget,
        args.bits,
        data=data,
        input_shape=DATASETS[args.dataset]["input_shape"],
        samples=args.samples,
        steps=args.steps,
        progress=not args.no_progress,
    )
    with open(args.out, "w") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
    print(
        f"plan for a budget of {args.budget} (planned layers {format_bytes(plan.layer_bytes)}, "
        f"total sensitivity {plan.sensitivity:.4g}):"
    )
    print(plan.table())
    print(f"wrote {args.out}; use it as the quant section of a recipe")
    return 0


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from qdistill.pack import gguf_cli

    return gguf_cli.run(args)


COMMANDS = {
    "demo": _cmd_demo,
    "plan": _cmd_plan,
    "bench": _cmd_bench,
    "run": _cmd_run,
    "eval": _cmd_eval,
    "info": _cmd_info,
    "report": _cmd_report,
    "export-gguf": _cmd_export_gguf,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a bad argument (one line printed, status 2) or --help (0)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except QDistillError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
