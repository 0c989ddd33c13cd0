"""docker-compose.yml, Dockerfile and prefect.yaml: valid, pinned, and free of secrets."""
from __future__ import annotations

import os
import shutil
import subprocess
from importlib.metadata import version

import pytest
import yaml

from conftest import ROOT


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) if present, else Debian's `docker-compose` (v1)."""
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
        if ok:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture
def compose_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PREFECT_UI", "PREFECT_PORT"))}
    env["POSTGRES_PASSWORD"] = "test-only-password"
    return env


def run_config(env) -> subprocess.CompletedProcess:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (scripts/test.sh installs Debian's docker-compose)")
    return subprocess.run(cli + ["-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_compose_config_is_valid(compose_env):
    proc = run_config(compose_env)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    services = cfg["services"]
    assert {"postgres", "prefect-server", "worker-cpu", "worker-gpu", "deploy"} <= set(services)
    assert "ports" not in services["postgres"], "the database must not be published to the host"
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{version('prefect')}-python3.11"
    assert "healthcheck" in services["prefect-server"]
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu.get("shm_size")
    for name in ("worker-cpu", "worker-gpu"):
        assert services[name]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert any(str(v).endswith(":/data") or "/data" in str(v) for v in services[name]["volumes"])
    assert "pgdata" in cfg["volumes"] and "data" in cfg["volumes"]


def test_compose_requires_password_from_env(compose_env):
    compose_env.pop("POSTGRES_PASSWORD")
    proc = run_config(compose_env)
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr


def test_no_secrets_in_repo():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_dockerfile_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" in text and "COPY . ." in text


def test_prefect_yaml_deployments():
    cfg = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert cfg["prefect-version"] == version("prefect")
    deps = {(d["entrypoint"].split(":")[1], d["name"]): d for d in cfg["deployments"]}
    assert set(deps) == {("build_dataset", "default"), ("train_and_eval", "default")}
    assert deps[("build_dataset", "default")]["work_pool"]["name"] == "cpu"
    assert deps[("train_and_eval", "default")]["work_pool"]["name"] == "gpu"


def test_secrets_and_local_state_stay_out_of_the_image():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".env", ".git", ".venv", "data", "runs"):
        assert entry in ignored, entry
    # the placeholder is gone from the example: an unchanged copy fails `docker compose config`
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["POSTGRES_PASSWORD"] == ""


def test_image_runs_as_an_unprivileged_user():
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the last USER of the image must not be root"
    last_user = max(i for i, words in enumerate(lines) if words[0] == "USER")
    assert any(words[0] in ("CMD", "ENTRYPOINT") for words in lines[last_user:])


def test_postgres_refuses_the_placeholder_password(tmp_path):
    """The postgres service's entry point, run by sh as compose would ($$ -> $), with a stand-in for
    the image's docker-entrypoint.sh: change-me stops it with one line, a real password starts it."""
    cfg = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    entrypoint = cfg["services"]["postgres"]["entrypoint"]
    assert entrypoint[:2] == ["sh", "-c"]
    script = entrypoint[2].replace("$$", "$")
    stand_in = tmp_path / "docker-entrypoint.sh"
    stand_in.write_text('#!/bin/sh\necho "postgres started with $*"\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    refused = subprocess.run(["sh", "-c", script], env={**env, "POSTGRES_PASSWORD": "change-me"},
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "started" not in refused.stdout
    assert refused.stderr.strip() == "POSTGRES_PASSWORD is the placeholder change-me: set a real password in .env"
    started = subprocess.run(["sh", "-c", script], env={**env, "POSTGRES_PASSWORD": "a-real-one"},
                             capture_output=True, text=True)
    assert started.returncode == 0 and started.stdout.strip() == "postgres started with postgres"
