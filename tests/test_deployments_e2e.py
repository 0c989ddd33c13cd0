"""End to end through the user's interface: a real Prefect server, ``python -m flows.serve`` registering
``build-dataset/default`` and ``train-and-eval/default``, both run with ``python -m flows.follow`` (the demo's
way: start the run, print its log lines live) on small data, re-runs that are Skipped, bad input failing in one line, ``prefect.yaml``'s entrypoints,
and the Prefect UI in headless Chromium showing the runs and their artifacts (screenshots saved)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import prefect_api as api
from build_data import copy_photos, synthetic_identities
from conftest import ROOT
from datasets.rec_layout import read_rec_index
from flows.demo import deployment_run_argv
from flows.local import LocalStack, start_serve, stop
from tasks.training.launcher import stop_process_tree

pytestmark = pytest.mark.prefect_server
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run(stack: LocalStack, deployment: str, params: dict) -> subprocess.CompletedProcess:
    return subprocess.run(deployment_run_argv(deployment, params, timeout_s=900), cwd=ROOT, env=stack.env(),
                          capture_output=True, text=True, timeout=1000)


def _flow_run(client, output: str):
    run_id = next(line.split("UUID:")[1].strip() for line in output.splitlines() if "UUID:" in line)
    return client.read_flow_run(run_id)


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """The deployments served against the session's server, and inputs: photos, generated faces, pairs."""
    from datasets.synthetic import write_pairs_csv

    level = os.environ.get("PREFECT_LOGGING_LEVEL")
    os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"  # the served runs log as a user's do (the suite runs at WARNING)
    try:
        start_serve(prefect_server, timeout_s=240)
    finally:
        if level is None:
            os.environ.pop("PREFECT_LOGGING_LEVEL", None)
        else:
            os.environ["PREFECT_LOGGING_LEVEL"] = level
    root = tmp_path_factory.mktemp("e2e")
    raw = copy_photos(root / "photos")
    faces = root / "faces"
    synthetic_identities(faces, range(12), images=4)
    held = synthetic_identities(root / "held", range(500, 506), images=4)
    pairs = write_pairs_csv(root / "pairs.csv", held, num_pairs=20, folds=10, relative_to=root / "held")
    build = {"name": "e2e", "raw_dir": str(raw), "aligned_dirs": [str(faces)], "align": {"device": "cpu"},
             "pairs": [{"name": "e2e_val", "file": str(pairs), "image_root": str(root / "held"), "aligned": True}]}
    train = {"dataset": "e2e", "name": "e2e-run", "network": "m05", "loss": "cosface", "emb_size": 32, "per_batch_size": 8,
             "max_steps": 4, "verbose": 4, "ckpt": 1, "lr": 0.05, "device": "cpu",
             "options": {"version_input": 0, "margin_s": 16.0, "num_workers": 0, "frequent": 1}}
    return {"stack": prefect_server, "build": build, "train": train}


@pytest.fixture(scope="module")
def first_runs(served):
    stack = served["stack"]
    built = _run(stack, "build-dataset/default", served["build"])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    trained = _run(stack, "train-and-eval/default", served["train"])
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    # Progress where people look: the terminal shows the UI address and the stages' progress lines.
    for out in (built.stdout, trained.stdout):
        assert f"Prefect UI: {stack.ui_url}/runs/flow-run/" in out and out.rstrip().endswith("COMPLETED")
    assert re.search(r"align raw: detect \+ warp: (\d+)/\1 \(100%\), [0-9.]+ items/s, 0s left", built.stdout), built.stdout[-3000:]
    assert re.search(r"step 4/4 .* left", trained.stdout), trained.stdout[-3000:]
    with api.client() as client:
        return {"build": _flow_run(client, built.stdout), "train": _flow_run(client, trained.stdout)}


def test_both_deployments_run_to_completion_with_their_artefacts(served, first_runs):
    stack = served["stack"]
    assert first_runs["build"].state.is_completed() and first_runs["train"].state.is_completed()
    dataset = stack.data_root / "datasets" / "e2e"  # FACEPIPE_DATA_ROOT of the served process
    index = read_rec_index(dataset)
    assert len(index.identities) == 12 + 2 and (dataset / "e2e_val.bin").is_file()
    assert (dataset / "align" / "raw" / "manifest.parquet").is_file() and (dataset / "pack" / "manifest.parquet").is_file()
    run = stack.data_root / "runs" / "e2e-run"
    assert (run / "train" / "checkpoints" / "best.pt").is_file() and (run / "export" / "model.onnx").is_file()
    assert (run / "verification" / "verification.parquet").is_file()
    with api.client() as client:
        keys = set(api.artifacts(client, [first_runs["build"].id, first_runs["train"].id]))
    assert {"build-dataset-counts", "build-dataset-samples", "verification-metrics", "verification-roc",
            "train-and-eval-summary"} <= keys


def test_second_runs_are_skipped(served, first_runs):
    stack = served["stack"]
    for deployment, params, stages in (("build-dataset/default", served["build"], ("lst", "pack", "gather")),
                                       ("train-and-eval/default", served["train"], ("train", "verification", "export"))):
        again = _run(stack, deployment, params)
        assert again.returncode == 0, again.stdout[-3000:]
        with api.client() as client:
            flow_run = _flow_run(client, again.stdout)
            states = api.task_states(client, [r.id for r in api.runs_below(client, flow_run.id)])
        found = {stage: [state for name, state in states.items() if name == stage or name.startswith(f"{stage}-")]
                 for stage in stages}
        assert all(found.values()) and {s for v in found.values() for s in v} == {"Skipped"}, states


def test_bad_input_fails_in_one_line(served, first_runs):
    failed = _run(served["stack"], "train-and-eval/default", {**served["train"], "network": "r7", "name": "bad"})
    assert failed.returncode != 0
    with api.client() as client:
        flow_run = _flow_run(client, failed.stdout)
    assert flow_run.state.is_failed()
    message = flow_run.state.message
    assert "option 'network': network 'r7' is not a known code" in message and "\n" not in message.strip()
    missing = _run(served["stack"], "build-dataset/default", {**served["build"], "name": "bad", "raw_dir": "/no/such/dir"})
    assert missing.returncode != 0
    with api.client() as client:
        assert "raw_dir /no/such/dir is not a folder" in _flow_run(client, missing.stdout).state.message


def test_prefect_yaml_entrypoints_load_the_served_flows():
    from prefect.flows import load_flow_from_entrypoint

    cfg = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {load_flow_from_entrypoint(str(ROOT / d["entrypoint"])).name for d in cfg["deployments"]}
    assert names == {"build-dataset", "train-and-eval"}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")
def test_prefect_ui_shows_the_runs_and_artifacts(served, first_runs, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    stack = served["stack"]
    with api.client() as client:
        found = api.artifacts(client, [first_runs["build"].id, first_runs["train"].id])
    shots = Path(os.environ.get("FACEPIPE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{stack.ui_url}/runs")
            page.get_by_text(first_runs["build"].name).first.wait_for()
            page.get_by_text(first_runs["train"].name).first.wait_for()
            page.screenshot(path=str(shots / "runs.png"), full_page=True)
            for key, wanted in (("build-dataset-counts", "align/raw"), ("build-dataset-samples", "img"),
                                ("verification-metrics", "e2e_val"), ("verification-roc", "img"),
                                ("train-and-eval-summary", "verification")):
                page.goto(f"{stack.ui_url}/artifacts/artifact/{found[key].id}")
                try:
                    if wanted == "img":
                        page.locator("img[src^='data:image/']").first.wait_for()
                    else:
                        page.get_by_text(wanted).first.wait_for()
                finally:
                    page.screenshot(path=str(shots / f"{key}.png"), full_page=True)
        finally:
            browser.close()
    assert all((shots / f"{name}.png").stat().st_size > 10_000 for name in ("runs", "verification-roc", "build-dataset-samples"))


def test_compose_deploy_command_registers_prefect_yaml_and_a_process_worker_runs_it(served, first_runs):
    """docker-compose's one-shot ``deploy`` command (pools, the gpu limit, ``prefect --no-prompt deploy --all``)
    against the real server, then a ``prefect worker`` on pool cpu runs build-dataset/default (cached: Skipped).
    Runs last: it replaces the served deployments by the work-pool ones."""
    stack = served["stack"]
    stop(stack, "serve")  # the worker, not the serve process, must pick the run up
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["deploy"]["command"][-1]
    env = {**stack.env(), "FACEPIPE_APP_DIR": str(ROOT)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `prefect` of this venv
    deployed = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    with api.client() as client:
        pools = {f"{client.read_flow(d.flow_id).name}/{d.name}": d.work_pool_name for d in client.read_deployments()}
        assert client.read_work_pool("cpu").type == "process" and client.read_work_pool("gpu").type == "process"
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
    assert pools == {"build-dataset/default": "cpu", "train-and-eval/default": "gpu"}
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu", "--type", "process"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        params = {**served["build"], "data_root": str(stack.data_root)}  # the pool sets FACEPIPE_DATA_ROOT=/data
        again = _run(stack, "build-dataset/default", params)
        assert again.returncode == 0, again.stdout[-3000:]
        with api.client() as client:
            flow_run = _flow_run(client, again.stdout)
            states = api.task_states(client, [r.id for r in api.runs_below(client, flow_run.id)])
        assert flow_run.work_pool_name == "cpu" and flow_run.state.is_completed()
        assert {state for name, state in states.items() if name.startswith("pack")} == {"Skipped"}
    finally:
        worker.send_signal(signal.SIGINT)
        stop_process_tree(worker.pid, grace_s=20, popen=worker)
