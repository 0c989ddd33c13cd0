"""The ``facepipe`` command and the stage command lines (``tasks.cli``, ``flows.cli``).

Parsers are generated from the config models: every option has help text with its default, both
image-size spellings are accepted, ``--help`` needs neither torch nor prefect nor OpenCV (checked on
the modules a fresh interpreter has loaded, never by timing), bad input ends in one ``error:`` line
with exit status 2, and the trainer stops cleanly on SIGTERM and on a double Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT
from flows import cli as facepipe
from tasks import cli
from tasks.alignment.config import AlignConfig
from tasks.configs import PackConfig
from tasks.stage import commit_record
from tasks.training.config import TrainConfig, load_config
from train_data import tiny_config, tiny_dataset

COMMANDS = ["align", "lst", "pack", "merge", "bins", "train", "evaluate", "megaface", "ijb", "export", "serve", "demo"]
HEAVY = ("torch", "prefect", "cv2")
#: ``python -m <module> --help`` parses before importing the stage's dependencies too.
STAGE_MODULES = ["tasks.align", "tasks.lst", "tasks.pack", "tasks.merge", "tasks.bins", "tasks.verification",
                 "tasks.megaface", "tasks.export", "tasks.train", "tasks.training"]


@pytest.fixture
def keep_logging():
    """``execute`` sets up logging with force=True: give the root logger its handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_every_stage_command_is_a_facepipe_subcommand_and_a_console_script():
    assert set(cli.COMMANDS) | {"serve", "demo"} == set(COMMANDS)
    text = (ROOT / "pyproject.toml").read_text()
    assert 'facepipe = "flows.cli:main"' in text and 'facepipe-serve = "flows.serve:main"' in text
    sub = next(a for a in facepipe.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == COMMANDS


def test_building_every_parser_imports_neither_torch_nor_prefect_nor_opencv():
    code = (
        "import sys, contextlib, io\n"
        "from flows.cli import main\n"
        f"for argv in [['--help']] + [[c, '--help'] for c in {COMMANDS!r}]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code == 0, (argv, exc.code)\n"
        "import runpy\n"
        f"for module in {STAGE_MODULES!r}:\n"
        "    sys.argv = [module, '--help']\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code == 0, (module, exc.code)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "import datasets.face_align  # the check itself can fail: this one imports OpenCV\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after = proc.stdout.strip().splitlines()
    assert before == "[]", f"building the parsers imported {before}"
    assert after != "[]"


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = cli.build_parser(name)
    for action in _options(parser):
        text = action.help or ""
        assert text and text != argparse.SUPPRESS, f"{name} {action.option_strings}: no help"
        assert ("default" in text or "(required)" in text or text.startswith(("same as", "set --", "not an option here"))
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction))
                ), f"{name} {action.option_strings}: default not shown: {text!r}"


def test_options_are_generated_from_the_config_models():
    """Each field of a stage's model is an option (pack's --jpeg-quality was missing from a hand copy)."""
    models = {"align": AlignConfig, "pack": PackConfig, "train": TrainConfig}
    for name, model in models.items():
        dests = {a.dest for a in _options(cli.build_parser(name))}
        assert set(model.model_fields) <= dests, f"{name}: {set(model.model_fields) - dests} missing"
    args = cli.build_parser("pack").parse_args(["x.lst", "out", "--jpeg-quality", "80", "--shuffle", "--seed", "3"])
    assert cli.config_from_args(args, PackConfig) == PackConfig(jpeg_quality=80, shuffle=True, seed=3)
    args = cli.build_parser("lst").parse_args(["out", "a", "b", "--min-images", "1", "--no-fallback"])
    assert (args.sources, args.min_images, args.include_fallback) == (["a", "b"], 1, False)
    args = cli.build_parser("evaluate").parse_args(["--far-targets", "0.1,0.01", "m.pt", "a.bin", "--out-dir", "o"])
    assert (args.far_targets, args.model, args.targets) == ([0.1, 0.01], "m.pt", ["a.bin"])
    args = cli.build_parser("align").parse_args(["--already-aligned", "raw", "out", "--force"])
    assert (args.already_aligned, args.raw_dir, args.force) == (True, "raw", True)  # a flag before a positional
    help_text = cli.build_parser("lst").format_help()
    assert "--min-images N" in help_text and "(default: 2)" in help_text


@pytest.mark.parametrize("spelling", ["112x96", "112,96", "112X96"])
def test_both_image_size_spellings(spelling):
    args = cli.build_parser("align").parse_args(["raw", "out", "--image-size", spelling])
    assert cli.config_from_args(args, AlignConfig).image_size == "112x96"
    from tasks.evaluation.config import VerificationConfig

    args = cli.build_parser("evaluate").parse_args(["m.pt", "a.bin", "--out-dir", "o", "--image-size", spelling])
    assert cli.config_from_args(args, VerificationConfig).image_size == (112, 96)
    from tasks.training.config import config_from_args

    args = cli.build_parser("train").parse_args(["--image-size", spelling.lower()])
    assert config_from_args(args).image_size == "112,96"


def test_bad_option_values_name_the_flag():
    args = cli.build_parser("lst").parse_args(["out", "src", "--min-images", "0"])
    with pytest.raises(ValueError, match=r"^--min-images: Input should be greater than or equal to 1 \(got 0\)$"):
        cli.config_from_args(args, __import__("tasks.configs", fromlist=["LstConfig"]).LstConfig)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = facepipe.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_input_is_one_error_line_with_status_2_in_every_command(tmp_path, capsys, keep_logging):
    nothing = tmp_path / "nothing"
    bad_lst = tmp_path / "bad.lst"
    bad_lst.write_text("this is not a list line\n")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t1\nAlice\t1\t2\n")
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"not a checkpoint")
    cases = {
        "align": (["align", str(nothing), str(tmp_path / "a")], "nothing"),
        "lst": (["lst", str(tmp_path / "l"), str(nothing)], "nothing"),
        "pack": (["pack", str(bad_lst), str(tmp_path / "p")], "bad.lst"),
        "merge": (["merge", "--include", str(nothing), "--output", str(tmp_path / "m")], "nothing"),
        "bins": (["bins", str(pairs), str(tmp_path / "b"), "--name", "lfw"], "Alice"),
        "evaluate": (["evaluate", str(run / "best.pt"), "x.bin", "--out-dir", str(tmp_path / "e")], "last.pt"),
        "megaface": (["megaface", str(nothing / "m.onnx"), "--probes", "p", "--distractors", "d",
                      "--out-dir", str(tmp_path / "mf")], "m.onnx"),
        "export": (["export", str(run / "last.pt"), str(tmp_path / "x.onnx")], "last.pt"),
    }
    for name, (argv, named) in cases.items():
        code, out, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2, f"{name}: exit {code}\n{err}"
        assert lines and lines[-1].startswith("error: ") and named in lines[-1], f"{name}: {err}"
        assert "Traceback" not in err, f"{name}: {err}"


def test_evaluate_names_the_checkpoint_that_exists(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"best\.pt: model file does not exist; use .*last\.pt \(best\.pt is "
                                                r"written only when the run has \.bin targets"):
        cli.existing_model(str(ckpt / "best.pt"))
    assert cli.existing_model(str(ckpt / "last.pt")) == str(ckpt / "last.pt")


def test_bins_takes_the_align_options_or_the_recorded_ones(tmp_path):
    from tasks.bins import command_align_config

    parser = cli.build_parser("bins")
    args = parser.parse_args(["pairs.txt", "out", "--name", "lfw", "--image-size", "112,96", "--min-face-size", "40",
                              "--refine-passes", "0"])
    assert command_align_config(args) == AlignConfig(image_size="112x96", min_face_size=40, refine_passes=0)
    recorded = AlignConfig(image_size="112x96", min_face_size=30, max_side=800, face_policy="first")
    stage = tmp_path / "faces" / "align" / "raw"
    stage.mkdir(parents=True)
    commit_record(stage, "align", recorded.output_params(), {}, "code", [])
    args = parser.parse_args(["pairs.txt", "out", "--name", "lfw", "--align-from", str(tmp_path / "faces"),
                              "--refine-passes", "1"])
    assert command_align_config(args) == recorded.model_copy(update={"refine_passes": 1})
    args = parser.parse_args(["pairs.txt", "out", "--name", "lfw", "--align-from", str(tmp_path)])
    with pytest.raises(ValueError, match="no align stage record found"):
        command_align_config(args)


def test_progress_and_info_lines_reach_the_terminal(tmp_path):
    """prefect puts a WARNING handler on the root logger when imported; the stage command's INFO and
    progress lines must still be printed."""
    faces = tmp_path / "faces"
    faces.mkdir()
    lines = []
    for i in range(4):
        path = faces / f"{i}.jpg"
        cv2.imwrite(str(path), np.full((112, 112, 3), 40 * i, np.uint8))
        lines.append(f"1\t{path}\t{i // 2}\n")
    (tmp_path / "train.lst").write_text("".join(lines))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "pack", str(tmp_path / "train.lst"), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pack: copy faces into train.rec: 4/4 (100%)" in proc.stderr
    assert "pack: 4 images of 2 identities" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["images"] == 4


def test_a_preset_names_the_image_size_flag_and_warns_of_an_unreachable_schedule(tmp_path):
    from tasks.training.trainer import schedule_warnings, train

    cfg = load_config(ROOT / "configs" / "cpu-demo.yaml", {"dataset": str(tiny_dataset()), "output": str(tmp_path)})
    with pytest.raises(ValueError, match=r"images are 32x32 \(property\), but the run's image size is 56,56 .*"
                                         r"pass --image-size 32,32"):
        train(cfg)
    # cpu-demo on 300 images: 4 steps per epoch x 20 epochs = 80 steps < max-steps 375 and lr-steps 220,320
    (line,) = schedule_warnings(cfg, steps_per_epoch=4)
    assert line == ("schedule: --epochs 20 x 4 steps per epoch ends the run at step 80, before max-steps 375 and "
                    "lr-steps 220,320 (the learning rate never drops there); pass --epochs 94 to reach step 375")
    assert schedule_warnings(cfg, steps_per_epoch=19) == []
    assert "lr-steps 320" in schedule_warnings(cfg.model_copy(update={"max_steps": 0}), 15)[0]


def _start_training(tmp_path: Path, **overrides) -> subprocess.Popen:
    cfg = tiny_config(tmp_path / "run", max_steps=100_000, frequent=100_000, verbose=100_000, val_targets=[], **overrides)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    status = tmp_path / "run" / "status.json"
    while not (status.exists() and '"running"' in status.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    time.sleep(0.3)  # a few steps
    return proc


def test_sigterm_stops_training_at_the_next_step_with_a_checkpoint(tmp_path):
    proc = _start_training(tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM: stopping at the next step with a checkpoint" in err
    assert "Traceback" not in err
    result = json.loads(out.strip().splitlines()[-1].removeprefix("result: "))
    assert result["state"] == "stopped" and 0 < result["step"] < 100_000  # no log point was ever reached
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


_DESTRUCTOR_CTRL_C = """
import os, signal, threading, time
from tasks.training.trainer import _install_stop_handlers

stop = threading.Event()
_install_stop_handlers(stop)
stop.set()  # a first Ctrl-C was handled


class JoinsWorkers:  # as a DataLoader iterator's destructor joins its worker processes
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)


try:
    JoinsWorkers()
    time.sleep(10)
    print("never interrupted")
except KeyboardInterrupt:
    print("interrupted after the destructor")
"""


def test_a_second_ctrl_c_inside_a_destructor_still_stops_the_run():
    proc = subprocess.run([sys.executable, "-c", _DESTRUCTOR_CTRL_C], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "interrupted after the destructor", proc.stdout + proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr


def test_a_double_ctrl_c_ends_training_without_tracebacks(tmp_path):
    proc = _start_training(tmp_path, num_workers=1)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal sends Ctrl-C to the whole process group
    time.sleep(0.1)  # the first one is handled (and its checkpoint begun) before the second arrives
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), err  # 0 when the run had stopped before the second Ctrl-C
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.count("SIGINT: stopping at the next step") == 1, err  # not once more per DataLoader worker
    if proc.returncode == 130:
        assert err.strip().splitlines()[-1].startswith("interrupted: stopped now; the last checkpoint written is kept")
