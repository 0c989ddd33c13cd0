"""bench/gpu_session.sh: the one-command GPU session, checked on the CPU in its --smoke mode with prefect
unimportable (as on the bare CUDA image), and its verdicts on given figures."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from no_prefect import env_without_prefect

from bench.gpu_session import PARTS, verdicts


def _session(tmp_path: Path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, Path]:
    import sys

    env = env_without_prefect(tmp_path / "site")
    out = tmp_path / "out"
    env.update(OUT=str(out), PYTHON=sys.executable, FACEPIPE_NO_WHEELS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, out


def test_smoke_env_part_prints_the_header_and_writes_json(tmp_path: Path):
    proc, out = _session(tmp_path, "--parts", "env", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = json.loads((out / "env.json").read_text())
    assert env["status"] == "ok" and env["env"]["cores"] == os.cpu_count() and env["matmul_bf16_tflops"] > 0
    assert "dev_shm_gib" in env["env"] and env["bandwidth_gb_s"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts"]["env"]["status"] == "ok" and len(summary["verdicts"]) == 6
    assert "env: bf16 matmul peak" in proc.stdout and "smoke run on the CPU: not a speed claim" in proc.stdout


@pytest.mark.slow
def test_smoke_runs_every_part_without_prefect(tmp_path: Path):
    proc, out = _session(tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in PARTS:
        part = json.loads((out / f"{name}.json").read_text())
        assert part["status"] == "ok", (name, part)
    rows = json.loads((out / "train-eager.json").read_text())["rows"]
    assert rows and all(r["samples_per_s"]["median"] > 0 and r["steps"] == 4 for r in rows)
    assert json.loads((out / "align.json").read_text())["faces"]["ours"] > 0
    sets = json.loads((out / "extract.json").read_text())["three_sets"]["sets"]
    assert set(sets) == {"lfw", "cfp_fp", "agedb_30"}


def test_verdicts_name_the_figure_the_target_and_the_limit():
    def row(network, batch, compiled, rate, wait=1.0):
        return {"network": network, "batch": batch, "compiled": compiled, "samples_per_s": {"median": rate},
                "data_wait_pct": wait, "mfu_vs_989": 0.3}

    parts = {
        "train-eager": {"rows": [row("r50", 512, False, 2000), row("r100", 512, False, 1500, wait=25.0)]},
        "train-compiled": {"rows": [row("r50", 512, True, 4200), {"network": "r100", "batch": 512, "error": "OOM"}]},
        "train-loader": {"rows": [row("r50", 512, False, 1000)]},
        "extract": {"extraction": {"ours": [{"images_per_s": 3500.0}]},
                    "three_sets": {"total_s": 18.0, "sets": {"lfw": {"decode_s": 12.0}}}},
    }
    by = {v["target"]: v for v in verdicts(parts)}
    assert by["r50_samples_per_s"]["pass"] and by["r50_samples_per_s"]["config"] == "r50 batch 512 compiled"
    assert "loader-bound" in by["r50_samples_per_s"]["limit"] and "compile pays" in by["r50_samples_per_s"]["limit"]
    assert by["r100_samples_per_s"]["pass"] is False and by["r100_samples_per_s"]["limit"] == "loader"
    assert by["r100_extract_images_per_s"]["pass"] is True
    assert by["three_sets_s"]["pass"] is False and by["three_sets_s"]["limit"].startswith("host")
    assert by["align_speedup"]["verdict"] == "not measured" and by["step_host_syncs"]["value"] is None
