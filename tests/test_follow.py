"""``python -m flows.follow``: a flow run's log lines (its tasks' and its subflows' too) in the terminal."""
from __future__ import annotations

import io
import logging

import pytest
from prefect import flow, task

from flows.follow import _parse_params, follow, main
from tasks.runtime import Progress, logger

pytestmark = pytest.mark.prefect_server


@task(name="count-task")
def _count(total: int) -> int:
    progress = Progress("follow-test", total=total, description="counting", log_every_s=0)
    for done in range(1, total + 1):
        progress.update(done)
    return total


@flow(name="follow-child")
def _child() -> None:
    logger().warning("from the subflow")


@flow(name="follow-parent")
def _parent(total: int) -> int:
    logger().info("parent starts")
    _child()
    return _count(total)


@pytest.fixture
def info_logs():
    """Run loggers at INFO for the test (the suite runs Prefect at WARNING)."""
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def test_follow_prints_the_logs_of_the_run_its_tasks_and_subflows(prefect_server, info_logs):
    state = _parent(3, return_state=True)
    out = io.StringIO()
    final = follow(state.state_details.flow_run_id, poll_s=0.2, timeout_s=120, out=out)
    lines = out.getvalue().splitlines()
    assert final == "COMPLETED"
    assert any(line.endswith("INFO    parent starts") for line in lines), lines
    assert any("WARNING [" in line and line.endswith("from the subflow") for line in lines), lines
    counted = [line for line in lines if "[count-task-" in line and "counting: " in line]
    assert [c.split("counting: ")[1].split(" ")[0] for c in counted] == ["1/3", "2/3", "3/3"], lines
    assert "items/s, 0s left" in counted[-1]
    assert len(lines) == len(set(lines))  # each line once, although every round re-reads recent logs


def test_parameters_and_errors_of_the_command(prefect_server, capsys):
    assert _parse_params(["name=faces", "max_steps=4", "align={\"device\": \"cpu\"}"], '{"preset": "x"}') == {
        "preset": "x", "name": "faces", "max_steps": 4, "align": {"device": "cpu"}}
    with pytest.raises(ValueError, match="expected name=value"):
        _parse_params(["oops"], None)
    assert main(["not-a-uuid"]) == 2 and "error:" in capsys.readouterr().err


def test_an_unreachable_server_is_one_line(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # the discard port: nobody listens
        assert main(["build-dataset/default", "-p", "name=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Prefect API at http://127.0.0.1:9/api") and "\n" not in err
