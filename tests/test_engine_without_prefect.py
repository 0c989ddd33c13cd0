"""The engines run where prefect is not installed (the bare CUDA image of bench/gpu_session.sh):
training, evaluation, alignment, checkpoints, ONNX export and every bench/ module import with
``prefect`` unimportable, and a 2-step training with an evaluation, a checkpoint and an export runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from no_prefect import env_without_prefect

ENGINES = ["tasks.training", "tasks.training.trainer", "tasks.training.launcher", "tasks.training.config",
           "tasks.evaluation", "tasks.evaluation.embed", "tasks.evaluation.model", "tasks.evaluation.pairs",
           "tasks.evaluation.megaface", "tasks.evaluation.onnx_export", "tasks.alignment", "tasks.checkpoint",
           "tasks.runtime", "models", "datasets.rec_dataset", "datasets.verification_bin"]

SCRIPT = """
import importlib, sys
from pathlib import Path
try:
    import prefect
except ImportError:
    pass
else:
    raise SystemExit("prefect is importable: the blocker did not load")
for name in sys.argv[2:]:
    importlib.import_module(name)
from train_data import tiny_config
from tasks.training.trainer import train
from tasks.evaluation.onnx_export import export_onnx
out = Path(sys.argv[1])
result = train(tiny_config(out / "run", max_steps=2, frequent=1, verbose=2, ckpt=3, val_targets=["tiny_val"]))
assert result.step == 2 and result.last_checkpoint is not None and "tiny_val" in result.val, result
exported = export_onnx(result.last_checkpoint, out / "model.onnx")
assert exported.max_abs_diff <= 1e-4
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "prefect")
assert not leaked, leaked
print("ran without prefect:", result.step, "steps,", exported.path.name)
"""


def test_engines_and_benchmarks_run_without_prefect(tmp_path: Path):
    bench = [f"bench.{p.stem}" for p in sorted((ROOT / "bench").glob("*.py")) if p.stem != "__init__"]
    env = env_without_prefect(tmp_path / "site")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *ENGINES, *bench], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ran without prefect: 2 steps, model.onnx" in proc.stdout


def test_a_stage_still_needs_prefect(tmp_path: Path):
    """The blocker works: a stage module (which imports prefect) fails to import under it."""
    env = env_without_prefect(tmp_path / "site")
    proc = subprocess.run([sys.executable, "-c", "import tasks.export"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "made unimportable by tests/no_prefect.py" in proc.stderr
