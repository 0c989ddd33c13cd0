"""``facepipe``: one command for every stage and engine, and for the local server and demo.

    facepipe align RAW_DIR OUT_DIR [--image-size 112,112] [--min-face-size 20] ...
    facepipe lst OUT_DIR ALIGNED_DIR... ; facepipe pack LST OUT_DIR ; facepipe merge --include A,B --output C
    facepipe bins PAIRS OUT_DIR --name lfw [--align-from data/datasets/faces]
    facepipe train --config configs/r50-cosface.yaml --dataset DIR --output RUN_DIR [--per-batch-size 64 ...]
    facepipe evaluate RUN_DIR/checkpoints/last.pt lfw.bin --out-dir DIR ; facepipe megaface ... ; facepipe ijb ... ; facepipe export CKPT OUT.onnx
    facepipe serve ; facepipe demo [--stop]

The stage and engine commands are :mod:`tasks.cli`'s (the same parsers as ``python -m tasks.<stage>``,
generated from the stages' config models). Only the chosen command's parser is built, and a stage
module (prefect, torch, OpenCV) is imported only to run it, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from tasks import cli

__all__ = ["main"]

#: Commands of this package: description (the stage commands' come from tasks.cli.COMMANDS).
_FLOW_COMMANDS = {
    "serve": "Serve the deployments build-dataset/default and train-and-eval/default from this process "
             "(PREFECT_API_URL) until SIGTERM/Ctrl-C.",
    "demo": "The one-command demo on the local embedded default (what scripts/demo.sh runs).",
}
_ORDER = ["align", "lst", "pack", "merge", "bins", "train", "evaluate", "megaface", "ijb", "export", "serve", "demo"]


def _description(name: str) -> str:
    return cli.COMMANDS[name].description if name in cli.COMMANDS else _FLOW_COMMANDS[name]


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The ``facepipe`` parser; only the ``chosen`` command's own arguments are added."""
    parser = argparse.ArgumentParser(
        prog="facepipe", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The InsightFace face-recognition workflow: one command per stage.",
        epilog="Run 'facepipe COMMAND --help' for a command's options. Every stage command is also "
               "'python -m tasks.<stage>' (evaluate: tasks.verification; train: tasks.training).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _ORDER:
        description = _description(name)
        p = sub.add_parser(name, help=description.split(". ")[0].rstrip("."), description=description, allow_abbrev=False)
        if name != chosen:
            continue
        if name in cli.COMMANDS:
            cli.build_parser(name, parser=p)
        elif name == "demo":
            importlib.import_module("flows.demo").add_arguments(p)
    return parser


def _run_flow_command(args: argparse.Namespace) -> int:
    if args.command == "serve":
        importlib.import_module("flows.serve").main()
        return 0
    return importlib.import_module("flows.demo").run(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in _ORDER else None).parse_args(argv)
    if args.command in cli.COMMANDS:
        module, function = cli.COMMANDS[args.command].runner.split(":")
        try:
            run = getattr(importlib.import_module(module), function)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return cli.EXIT_INTERRUPTED
        if args.command == "train":  # the trainer sets up its own logging and stop handlers
            return run(args)
        return cli.execute(run, args)
    return cli.execute(_run_flow_command, args, logging_ready=args.command == "serve")


if __name__ == "__main__":
    sys.exit(main())
