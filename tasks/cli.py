"""Command lines of the stages and engines, generated from their config models.

Every command (``facepipe <command>``, :mod:`flows.cli`, and ``python -m tasks.<stage>``, which
build the same parser) is described here by a :class:`Command`: a few positional/run arguments plus
one option per field of the stage's pydantic config model (:func:`add_config_arguments`: flag
``--field-name``, help = the field's description and its default, choices from ``Literal`` types).
A hand-written copy of a stage's options would drift from the model; a generated one cannot.

This module imports only the light config modules (:mod:`tasks.configs`,
:mod:`tasks.alignment.config`, :mod:`tasks.evaluation.config`, :mod:`tasks.training.config`: pydantic
only), never a stage, torch, OpenCV or prefect, so ``--help`` answers at once. :func:`execute` runs a
parsed command: logging to the terminal at INFO (set up after prefect's handlers, ``force=True``), bad
input as one ``error: ...`` line on stderr with exit status 2, Ctrl-C as one line with status 130.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, NoReturn

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from datasets.errors import validation_message
from datasets.locks import FolderBusy

__all__ = ["COMMANDS", "Command", "add_config_arguments", "build_parser", "config_from_args", "execute",
           "existing_model", "main", "setup_logging"]

#: Exceptions that mean bad input (a file, a value, an option): one line, exit status 2.
BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                              IsADirectoryError, FolderBusy)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


# --- options from a config model ----------------------------------------------------------------------


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _bool(value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _split(value: str) -> list[str]:
    """``"112,112"``, ``"112x112"``, ``"0.6 0.7"`` -> the parts."""
    value = value.strip().lower()
    return [p for p in re.split(r"[,\sx]+" if re.fullmatch(r"[\d\sx,]+", value) else r"[,\s]+", value) if p]


def _size_spelling(value: str) -> str:
    return value.replace(",", "x").replace(" ", "").lower()


class _JoinedValues(argparse.Action):
    """``--x 1,2,3``, ``--x 1 2 3`` or ``--x 112x112`` -> ``[1, 2, 3]`` / ``[112, 112]`` of ``item``."""

    def __init__(self, *args: Any, item: type = str, **kwargs: Any) -> None:
        self.item = item
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        values = [values] if isinstance(values, str) else values
        parts = [p for v in values for p in (_split(v) if self.item is not str else v.split(","))]
        try:
            setattr(namespace, self.dest, [self.item(p.strip()) for p in parts if p.strip()])
        except ValueError:
            parser.error(f"argument {option_string}: expected {self.item.__name__} values, got {' '.join(values)!r}")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value) or "empty"
    return str(value)


def field_default(info: Any) -> Any:
    """The default of a pydantic field (``default_factory`` called); ``PydanticUndefined`` when required."""
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


def add_config_arguments(parser: argparse.ArgumentParser | Any, model: type[BaseModel], *,
                         exclude: Iterable[str] = (), aliases: Mapping[str, str] | None = None,
                         raw: bool = False, underscores: bool = False, title: str | None = None) -> None:
    """One option per field of ``model``: ``--field-name`` with ``dest=field_name`` and default None
    (so that :func:`config_from_args` passes only what was given and the model's defaults apply).

    Types: ``bool`` -> ``--flag`` (with ``raw`` also ``--flag true/false``) and ``--no-flag``; ``Literal`` ->
    choices; ``list[...]`` -> comma-separated values; ``tuple[...]`` -> values separated by commas,
    spaces or ``x`` (``--image-size 112x112``, ``112,112`` or ``112 112``); ``X | None`` -> X. Help
    text is the field's description plus its default. ``aliases`` maps extra option names (old
    InsightFace spellings) to fields; ``raw`` hands the values to the model as strings (its validators
    parse them); ``underscores`` also accepts ``--field_name``.
    """
    group = parser.add_argument_group(title) if title else parser
    skip = set(exclude)
    names = [n for n in model.model_fields if n not in skip]
    alias_of = {a: f for a, f in (aliases or {}).items() if f not in skip}
    for name in [*names, *alias_of]:
        field_name = alias_of.get(name, name)
        info = model.model_fields[field_name]
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if underscores and "_" in name else [])
        default = field_default(info)
        described = (info.description or field_name.replace("_", " ")).rstrip(".")
        if name in alias_of:
            help_text = f"same as --{field_name.replace('_', '-')}"
        elif default is PydanticUndefined:
            help_text = f"{described} (required)"
        elif "default" in described:  # the description says what the default means
            help_text = described
        else:
            help_text = f"{described} (default: {_show(default)})"
        ann, _optional = _unwrap(info.annotation)
        origin = typing.get_origin(ann)
        kwargs: dict[str, Any] = {"dest": field_name, "default": None, "help": help_text.replace("%", "%%")}
        if default is PydanticUndefined and name not in alias_of:
            kwargs["required"] = True
        if ann is bool:
            if raw:  # also --flag true/false, as YAML files spell it
                kwargs.update(nargs="?", const=True, type=_bool, metavar="BOOL")
            else:  # a plain flag, so that a positional argument may follow it
                kwargs.update(action="store_const", const=True)
            group.add_argument(*flags, **kwargs)
            group.add_argument(*[f"--no-{f[2:]}" for f in flags], dest=field_name, action="store_const", const=False,
                               default=None, help=f"set --{name.replace('_', '-')} to false")
            continue
        if raw:  # strings for the model's validators; choices and metavars only for the reader
            if origin is Literal and all(isinstance(c, str) for c in typing.get_args(ann)):
                kwargs["choices"] = list(typing.get_args(ann))
            else:
                kwargs["metavar"] = "H,W" if field_name == "image_size" else (
                    "A,B" if origin in (list, tuple) else _METAVARS.get(ann, "VALUE"))
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(ann))
            if all(isinstance(c, str) and re.fullmatch(r"\d+x\d+", c) for c in kwargs["choices"]):
                kwargs["type"] = _size_spelling  # image sizes: 112,112 and 112x112 alike
        elif origin in (list, tuple):
            item = typing.get_args(ann)[0] if typing.get_args(ann) else str
            item = item if item in (int, float, str) else str
            if origin is tuple:  # --thresholds 0.6 0.7 0.7 as well as 0.6,0.7,0.7
                kwargs.update(nargs="+", metavar="H,W" if field_name == "image_size" else "V")
            else:  # one comma-separated value, so that a positional argument may follow
                kwargs["metavar"] = "A,B"
            kwargs.update(action=_JoinedValues, item=item)
        elif ann in (int, float, str):
            kwargs.update(type=ann, metavar=_METAVARS[ann])
        else:
            kwargs["metavar"] = "VALUE"
        group.add_argument(*flags, **kwargs)


def config_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The options of ``model`` that were given on the command line."""
    return {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}


def config_from_args(args: argparse.Namespace, model: type[BaseModel], **base: Any) -> Any:
    """``model(**base, **given options)``; a bad value raises one-line ``ValueError``."""
    try:
        return model(**{**base, **config_values(args, model)})
    except ValidationError as exc:
        raise ValueError(validation_message(exc, flags=True)) from None


def existing_model(path: str) -> str:
    """``path`` when it exists; else ``FileNotFoundError`` naming the checkpoints that do exist beside it
    (a run without ``.bin`` targets writes ``last.pt`` only, no ``best.pt``)."""
    p = Path(path)
    if p.exists() or "," in path:  # 'prefix,epoch' is resolved by the loader
        return path
    near = sorted(q.name for q in p.parent.glob("*.pt")) if p.parent.is_dir() else []
    if "last.pt" in near:
        hint = f"; use {p.parent / 'last.pt'} (best.pt is written only when the run has .bin targets to choose by)" \
            if p.name == "best.pt" else f"; use {p.parent / 'last.pt'}"
    elif near:
        hint = f"; checkpoints there: {', '.join(near)}"
    else:
        hint = ""
    raise FileNotFoundError(f"{p}: model file does not exist{hint}")


# --- the commands ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command: its one-line description, the function adding its arguments to a parser, and the
    ``module:function`` that runs it with the parsed arguments (imported only then)."""

    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    runner: str


def _align(p: argparse.ArgumentParser) -> None:
    from tasks.alignment.config import AlignConfig

    p.add_argument("raw_dir", help="folder of photos, one sub-folder per identity")
    p.add_argument("out_dir", help="output folder (images/, manifest.parquet, stage.json)")
    add_config_arguments(p, AlignConfig, title="alignment options (AlignConfig)")
    p.add_argument("--shard-size", type=int, default=64, help="files per shard / part file (default: 64)")
    p.add_argument("--force", action="store_true", help="redo every file (default: reuse what is up to date)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: a table)")


def _lst(p: argparse.ArgumentParser) -> None:
    from tasks.configs import LstConfig

    p.add_argument("out_dir", help="output folder (train.lst, labels.csv, manifest.parquet)")
    p.add_argument("sources", nargs="+", help="align-stage folders (source name = folder name)")
    add_config_arguments(p, LstConfig, title="lst options (LstConfig)")
    p.add_argument("--no-fallback", dest="include_fallback", action="store_const", const=False,
                   help="same as --no-include-fallback")
    p.add_argument("--force", action="store_true", help="redo the stage even when it is up to date")


def _pack(p: argparse.ArgumentParser) -> None:
    from tasks.configs import PackConfig

    p.add_argument("lst", help="a .lst file or an lst-stage folder")
    p.add_argument("out_dir", help="output folder (train.rec, train.idx, property, manifest.parquet)")
    p.add_argument("--image-size", metavar="H,W",
                   help="image size, 112,112 or 112x112 (default: the lst stage's, or the first image's)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="number of classes written to property (default: largest label + 1)")
    add_config_arguments(p, PackConfig, title="pack options (PackConfig)")
    p.add_argument("--force", action="store_true", help="redo the stage even when it is up to date")


def _merge(p: argparse.ArgumentParser) -> None:
    from tasks.configs import MergeConfig

    p.add_argument("--include", required=True, metavar="A,B,...", help="comma-separated packed dataset folders, in order (required)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder of the merged set (required)")
    add_config_arguments(p, MergeConfig, title="merge options (MergeConfig)")
    p.add_argument("--force", action="store_true", help="redo the stage even when it is up to date")


def _bins(p: argparse.ArgumentParser) -> None:
    from tasks.alignment.config import AlignConfig
    from tasks.configs import PairsSet

    p.add_argument("pairs", help="pair list: LFW pairs.txt or CSV path_a,path_b,same")
    p.add_argument("out_dir", help="output folder (<name>.bin, faces/, manifest.parquet)")
    add_config_arguments(p, PairsSet, exclude=("file",), title="pair list options (PairsSet)")
    p.add_argument("--align-from", metavar="DIR",
                   help="an align-stage folder (or data set with align/<source>/) whose recorded alignment options "
                        "to reuse, so the .bin is aligned as its data set (default: the options below)")
    add_config_arguments(p, AlignConfig, exclude=("no_face", "already_aligned"),
                         title="alignment options (AlignConfig; face policy 'all' becomes 'insightface')")
    p.add_argument("--force", action="store_true", help="redo the stage even when it is up to date")


MODEL_HELP = ("a training checkpoint (.pt), an arcface_torch backbone.pth, an MXNet checkpoint ('prefix,epoch' or "
              "prefix-NNNN.params) or an .onnx file")


def _evaluation_flags(p: argparse.ArgumentParser) -> None:
    """``--bf16`` and ``--force`` of the evaluation stages."""
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    p.add_argument("--force", action="store_true", help="redo the stage even when it is up to date")


def _evaluate(p: argparse.ArgumentParser) -> None:
    from tasks.evaluation.config import VerificationConfig

    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("targets", nargs="+", help="verification packs (lfw.bin, cfp_fp.bin, ...)")
    p.add_argument("--out-dir", required=True, metavar="DIR",
                   help="output folder (verification.parquet, roc.npz, roc.png) (required)")
    add_config_arguments(p, VerificationConfig, title="verification options (VerificationConfig)")
    _evaluation_flags(p)


def _ijb(p: argparse.ArgumentParser) -> None:
    from tasks.evaluation.config import IjbConfig

    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("root", help="folder holding IJBB/ and/or IJBC/ (each with meta/ and loose_crop/), or one of them")
    p.add_argument("--target", action="append", choices=["IJBB", "IJBC"],
                   help="IJBB or IJBC (repeatable; default: every one under root)")
    p.add_argument("--out-dir", required=True, metavar="DIR",
                   help="output folder (ijb.parquet, ijb_roc.parquet, ijb_roc.png, features/) (required)")
    add_config_arguments(p, IjbConfig, title="IJB options (IjbConfig)")
    _evaluation_flags(p)


def _megaface(p: argparse.ArgumentParser) -> None:
    from tasks.evaluation.config import MegaFaceConfig

    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--probes", required=True, help="probe image list (facescrub_lst) or .rec set (required)")
    p.add_argument("--probe-root", metavar="DIR", help="folder the probe list's paths are relative to (default: the list's folder)")
    p.add_argument("--distractors", required=True, help="distractor image list (megaface_lst) or .rec set (required)")
    p.add_argument("--distractor-root", metavar="DIR",
                   help="folder the distractor list's paths are relative to (default: the list's folder)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder (megaface.parquet, CMC/ROC json) (required)")
    add_config_arguments(p, MegaFaceConfig, title="MegaFace options (MegaFaceConfig)")
    _evaluation_flags(p)


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="training checkpoint (.pt) or 'prefix,epoch', arcface_torch backbone.pth, "
                                      "MXNet checkpoint ('prefix,epoch' or prefix-NNNN.params)")
    p.add_argument("out", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="torch exporter (default: auto)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest allowed |onnxruntime - torch| of the L2-normalised embeddings (default: 0.0001)")


def _train(p: argparse.ArgumentParser) -> None:
    from tasks.training.config import ALIASES, REPLACED, TrainConfig

    p.add_argument("--config", metavar="YAML", help="YAML file of options, e.g. configs/cpu-demo.yaml (default: none)")
    add_config_arguments(p, TrainConfig, aliases=ALIASES, raw=True, underscores=True,
                         title="training options (TrainConfig; InsightFace spellings)")
    group = p.add_argument_group("train_softmax.py options with another home (each stops with what replaces it)")
    for name, text in REPLACED.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        group.add_argument(*flags, dest=f"replaced_{name}", nargs="?", const="true", default=None, metavar="VALUE",
                           help=f"not an option here: {text}".replace("%", "%%"))


COMMANDS: dict[str, Command] = {
    "align": Command("Detect faces (MTCNN) in RAW_DIR/<identity>/* and write aligned faces and manifest.parquet to OUT_DIR.",
                     _align, "tasks.align:run_command"),
    "lst": Command("Write train.lst and labels.csv from align-stage folders.", _lst, "tasks.lst:run_command"),
    "pack": Command("Pack an InsightFace .lst into train.rec/train.idx/property.", _pack, "tasks.pack:run_command"),
    "merge": Command("Merge packed datasets (dataset_merge.py).", _merge, "tasks.merge:run_command"),
    "bins": Command("Build a verification .bin from a pair list, aligned as a data set's faces.", _bins,
                    "tasks.bins:run_command"),
    "train": Command("Train a face-recognition model (InsightFace option names; see configs/*.yaml).", _train,
                     "tasks.training.trainer:run_command"),
    "evaluate": Command("Verification accuracy of an embedding model on .bin packs (the verification stage).",
                        _evaluate, "tasks.verification:run_command"),
    "megaface": Command("MegaFace identification and verification of an embedding model.", _megaface,
                        "tasks.megaface:run_command"),
    "ijb": Command("IJB-B / IJB-C 1:1 verification (and 1:N identification) of an embedding model.", _ijb,
                   "tasks.ijb:run_command"),
    "export": Command("Export a training checkpoint to ONNX and check it against torch.", _export,
                      "tasks.export:run_command"),
}


def build_parser(name: str, prog: str | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The parser of command ``name`` (``prog`` defaults to ``python -m <the module that runs it>``)."""
    command = COMMANDS[name]
    if parser is None:
        module = command.runner.split(":")[0].removesuffix(".trainer")
        parser = argparse.ArgumentParser(prog=prog or f"python -m {module}", description=command.description,
                                         allow_abbrev=False)
    command.arguments(parser)
    return parser


# --- running a command ------------------------------------------------------------------------------------


class _TerminalHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.<name>`` is when a line is logged, so that a command run
    in-process (a notebook, a test capturing output) never writes to a stream that was replaced or closed."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the current one is used instead
        pass


def setup_logging(level: int = logging.INFO, fmt: str = "%(asctime)s %(message)s", stream: str = "stderr") -> None:
    """INFO lines (progress included) to the terminal (``sys.stderr``, or ``sys.stdout`` with
    ``stream="stdout"``). The root logger's handlers are replaced: importing prefect has put a
    WARNING-level handler there already, which would make a plain ``basicConfig`` a no-op."""
    handler = _TerminalHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("facepipe").setLevel(level)


def _quiet_second_interrupt() -> None:
    """After a Ctrl-C: ignore another one while the process exits (no traceback from exit hooks)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def execute(run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *,
            logging_ready: bool = False) -> int:
    """Run a parsed command: logging set up, bad input as one ``error: ...`` line (exit status 2),
    Ctrl-C as one line (status 130)."""
    if not logging_ready:
        setup_logging()
    try:
        return int(run(args) or 0)
    except ValidationError as exc:
        print(f"error: {validation_message(exc, flags=True)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except BAD_INPUT as exc:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _quiet_second_interrupt()
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def run_command_line(name: str) -> NoReturn:
    """``python -m tasks.<stage>``: parse ``sys.argv`` with command ``name``'s parser *before* the stage's
    module (prefect, torch) is imported, so ``--help`` and bad options answer at once; then import the
    command's runner, :func:`execute` it and exit with its status."""
    args = build_parser(name).parse_args()
    module, function = COMMANDS[name].runner.split(":")
    sys.exit(execute(getattr(importlib.import_module(module), function), args))


def main(name: str, run: Callable[[argparse.Namespace], int | None], argv: list[str] | None = None,
         prog: str | None = None) -> int:
    """``python -m tasks.<name>``: parse ``argv`` with the command's parser and :func:`execute` ``run``."""
    args = build_parser(name, prog).parse_args(argv)
    return execute(run, args)
