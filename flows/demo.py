"""The one-command demo on the local embedded default (what ``bash scripts/demo.sh`` runs).

    python -m flows.demo            # server + deployments up, sample data, build-dataset, train-and-eval
    python -m flows.demo --stop     # stop the server and the deployment process

1. :func:`flows.local.up`: a Prefect server on SQLite at 127.0.0.1:4200 and ``python -m flows.serve``
   (deployments ``build-dataset/default`` and ``train-and-eval/default``).
2. :func:`prepare_sample` writes ``<data_root>/sample/``: generated identities (aligned 112x112 faces,
   :mod:`datasets.synthetic`), held-out generated identities and a pairs CSV over them. The bundled
   real photos (``sample/faces/raw``, licences in ``sample/faces/``) go through MTCNN detection.
3. ``python -m flows.follow build-dataset/default --params ...`` (:mod:`flows.follow`: starts the run
   and prints its log lines live, with every stage's done/total, rate and time left): the training
   set ``<data_root>/datasets/sample/`` with the verification set ``synth_val.bin``.
4. ``python -m flows.follow train-and-eval/default --params ...``: the ``cpu-demo`` preset
   (MobileNet 0.5, CosFace) at 112x112 on the CPU for a few minutes, verification, ONNX export.

Every stage is cached, so a second run takes seconds (the stages show as Skipped in the UI).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flows.local import DEFAULT_PORT, REPO, LocalStack, default_data_root, down, up
from tasks.stage import code_version, commit_record, current_record

__all__ = ["prepare_sample", "build_params", "train_params", "deployment_run_argv", "run_deployment", "add_arguments", "main", "run"]

SAMPLE_STAGE = "demo-sample"
PHOTOS = REPO / "sample" / "faces" / "raw"
#: Generated identities of the demo: training identities x images, held-out identities x images, pairs.
SAMPLE = {"identities": 200, "images": 10, "held_out_identities": 60, "held_out_images": 6, "pairs": 600, "seed": 0}


def prepare_sample(data_root: Path, sample: dict[str, int] = SAMPLE) -> Path:
    """Write ``<data_root>/sample/{identities,heldout,pairs.csv}`` unless already there; returns the folder."""
    from datasets.synthetic import SyntheticFaces, write_identity_folders, write_pairs_csv  # OpenCV: only when run

    out = data_root / "sample"
    code = code_version("datasets.synthetic", "datasets.face_drawing")
    if current_record(out, SAMPLE_STAGE, sample, {}, code) is not None:
        return out
    train = SyntheticFaces(sample["identities"], sample["images"], seed=sample["seed"])
    write_identity_folders(out / "identities", train)
    held = SyntheticFaces(sample["held_out_identities"], sample["held_out_images"], seed=sample["seed"],
                          first_identity=100_000)
    paths = write_identity_folders(out / "heldout", held)
    write_pairs_csv(out / "pairs.csv", paths, num_pairs=sample["pairs"], relative_to=out / "heldout")
    commit_record(out, SAMPLE_STAGE, sample, {}, code, ["pairs.csv"])
    return out


def build_params(data_root: Path, sample_dir: Path) -> dict[str, Any]:
    """Parameters of the demo's build-dataset run."""
    return {"name": "sample", "data_root": str(data_root), "raw_dir": str(PHOTOS),
            "aligned_dirs": [str(sample_dir / "identities")],
            "pairs": [{"name": "synth_val", "file": str(sample_dir / "pairs.csv"),
                       "image_root": str(sample_dir / "heldout"), "aligned": True}]}


def train_params(data_root: Path) -> dict[str, Any]:
    """Parameters of the demo's train-and-eval run."""
    return {"dataset": "sample", "name": "sample-demo", "data_root": str(data_root), "preset": "cpu-demo",
            "image_size": "112,112"}


def deployment_run_argv(deployment: str, params: dict[str, Any], timeout_s: float = 3600) -> list[str]:
    """argv of ``python -m flows.follow <deployment> --params <json>``: start the run and print its logs
    live (exit code 0 only when the run completes)."""
    return [sys.executable, "-m", "flows.follow", deployment, "--params", json.dumps(params),
            "--timeout", str(int(timeout_s))]


def run_deployment(stack: LocalStack, deployment: str, params: dict[str, Any], timeout_s: float = 3600) -> None:
    """Run ``deployment`` and print its log lines as they come; raises SystemExit when the run does not complete."""
    argv = deployment_run_argv(deployment, params, timeout_s)
    print(f"\n$ python -m flows.follow {deployment} --params '{json.dumps(params)}'", flush=True)
    done = subprocess.run(argv, cwd=REPO, env=stack.env(), check=False)
    if done.returncode != 0:
        raise SystemExit(f"{deployment}: the flow run did not complete (exit code {done.returncode}); "
                         f"see the run in the UI at {stack.ui_url}/runs and the logs in {stack.home / 'logs'}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``python -m flows.demo`` and ``facepipe demo``)."""
    parser.add_argument("--data-root", type=Path, default=default_data_root(),
                        help="folder of the server database, the sample, data sets and runs (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of the Prefect server (default: %(default)s)")
    parser.add_argument("--stop", action="store_true", help="stop the server and the deployment process")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The demo with parsed arguments."""
    stack = LocalStack(args.data_root.resolve(), args.port)
    if args.stop:
        down(stack)
        print("stopped the Prefect server and the deployment process")
        return 0
    started = time.monotonic()
    up(stack)
    print(f"Prefect server {stack.ui_url} (SQLite under {stack.home}); deployments served by python -m flows.serve")
    sample_dir = prepare_sample(stack.data_root)
    run_deployment(stack, "build-dataset/default", build_params(stack.data_root, sample_dir))
    run_deployment(stack, "train-and-eval/default", train_params(stack.data_root))
    run_dir = stack.data_root / "runs" / "sample-demo"
    print(f"\nDone in {time.monotonic() - started:.0f} s.\n"
          f"  Prefect UI:      {stack.ui_url}/runs  (flow runs, their logs and artifacts: {stack.ui_url}/artifacts)\n"
          f"  training set:    {stack.data_root / 'datasets' / 'sample'}\n"
          f"  run:             {run_dir}  (checkpoints, metrics.parquet, tensorboard/, export/model.onnx)\n"
          f"  stop everything: bash scripts/demo.sh stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
