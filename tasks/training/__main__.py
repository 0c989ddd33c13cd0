"""``python -m tasks.training``: one training run (see :mod:`tasks.training.trainer`)."""
import sys

from tasks.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
