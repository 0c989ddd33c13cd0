"""Run Python with ``prefect`` made unimportable, as on the bare CUDA image of the GPU session.

``env_without_prefect(folder)`` writes ``folder/sitecustomize.py`` (a ``sys.meta_path`` finder that
raises ImportError for ``prefect`` and ``prefect_*``) and returns an environment whose PYTHONPATH
starts with that folder, then the project root and ``tests/``.
"""
from __future__ import annotations

import os
from pathlib import Path

from conftest import ROOT

BLOCKER = '''
import sys


class _NoPrefect:
    """Finder that refuses prefect, as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "prefect" or name.startswith(("prefect.", "prefect_")):
            raise ModuleNotFoundError(f"No module named {name!r} (made unimportable by tests/no_prefect.py)")
        return None


sys.meta_path.insert(0, _NoPrefect())
'''


def env_without_prefect(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), str(ROOT / "tests")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env
