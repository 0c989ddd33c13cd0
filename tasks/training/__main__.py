"""``python -m tasks.training``: one training run (see :mod:`tasks.training.trainer`)."""
import sys

from tasks import cli

if __name__ == "__main__":
    args = cli.build_parser("train", "python -m tasks.training").parse_args()  # --help without torch
    from tasks.training.trainer import run_command

    sys.exit(run_command(args))
