"""Follow a flow run in the terminal: its log lines (and its subflow runs'), live, until it ends.

``prefect deployment run ... --watch`` prints only state changes and event names; the progress of
a stage (``align: detect + warp: 120/2000 (6%), 7.8 items/s, 4m01s left``, the training steps with
loss, samples/s and time left) is in the run's logs. This command prints those logs as they arrive:

    python -m flows.follow build-dataset/default -p name=faces -p raw_dir=/photos    # start a run and follow it
    python -m flows.follow train-and-eval/default --params '{"dataset": "faces", "preset": "cpu-demo"}'
    python -m flows.follow 0b5e...                     # follow a flow run that is already running (its id)

The first line gives the run's page in the UI. It polls the Prefect API (``PREFECT_API_URL``;
``prefect.toml`` points at the local server) every ``--poll`` seconds, prints each log line once as
``HH:MM:SS LEVEL [task run] message``, and exits when the run reaches a final state: code 0 when it
Completed, 1 otherwise (or when ``--timeout`` seconds pass; the run itself goes on).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import uuid
from typing import Any, Callable, TextIO

__all__ = ["follow", "start_run", "ui_address", "main"]

#: Seconds of logs read again in every round: lines sent late by another process are not missed.
LATE_S = 30.0


def ui_address(api_url: str) -> str:
    """The UI's base address for an API address (``http://127.0.0.1:4200/api`` -> ``http://127.0.0.1:4200``)."""
    from prefect.settings import PREFECT_UI_URL

    configured = PREFECT_UI_URL.value()
    if configured:
        return str(configured).rstrip("/")
    return api_url.rstrip("/").removesuffix("/api")


def _parse_params(pairs: list[str], params_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = json.loads(params_json) if params_json else {}
    if not isinstance(params, dict):
        raise ValueError(f"--params must be a JSON object, got {params_json!r}")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"-p {pair!r}: expected name=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def start_run(deployment: str, parameters: dict[str, Any]) -> uuid.UUID:
    """Create a flow run of ``deployment`` (``flow/deployment``) with ``parameters``; returns its id."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=0)
    return run.id


def _format(log: Any, task_names: dict[Any, str], flow_names: dict[Any, str], root: Any) -> str:
    stamp = log.timestamp.astimezone().strftime("%H:%M:%S")
    where = task_names.get(log.task_run_id) if log.task_run_id else None
    if where is None and log.flow_run_id != root:
        where = flow_names.get(log.flow_run_id)
    level = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}.get(log.level, str(log.level))
    return f"{stamp} {level:<7} " + (f"[{where}] " if where else "") + log.message


def follow(flow_run_id: uuid.UUID | str, *, poll_s: float = 1.0, timeout_s: float | None = None,
           out: TextIO = sys.stdout, client: Any = None, sleep: Callable[[float], None] = time.sleep) -> str:
    """Print the logs of a flow run and of its subflow runs until it ends; returns its final state's
    type (``COMPLETED``, ``FAILED``, ``CRASHED``, ``CANCELLED``) or ``TIMEOUT``.

    Logs reach the API in batches (every couple of seconds, from several processes), so each round
    re-reads the last ``LATE_S`` seconds (lines already printed are skipped) and, after the run's
    final state, two more rounds are read.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId,
        LogFilterTimestamp, TaskRunFilter, TaskRunFilterId,
    )
    from prefect.client.schemas.sorting import LogSort

    client = client or get_client(sync_client=True)
    root = uuid.UUID(str(flow_run_id))
    flow_runs = {root: client.read_flow_run(root)}
    flow_names = {root: flow_runs[root].name}
    task_names: dict[Any, str] = {}
    seen: set[Any] = set()
    newest = None
    started = time.monotonic()
    final_rounds = 0
    while True:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=list(flow_runs))))
        for child in children:
            flow_runs.setdefault(child.id, child)
            flow_names[child.id] = child.name
        after = None if newest is None else newest - datetime.timedelta(seconds=LATE_S)
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(flow_runs)),
                               timestamp=LogFilterTimestamp(after_=after) if after is not None else None)
        offset = 0
        while True:
            logs = client.read_logs(log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC, limit=200, offset=offset)
            unknown = {log.task_run_id for log in logs if log.task_run_id and log.task_run_id not in task_names}
            if unknown:
                for run in client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(unknown)))):
                    task_names[run.id] = run.name
            for log in logs:
                if log.id in seen:
                    continue
                seen.add(log.id)
                print(_format(log, task_names, flow_names, root), file=out, flush=True)
                newest = log.timestamp if newest is None or log.timestamp > newest else newest
            if len(logs) < 200:
                break
            offset += len(logs)
        state = client.read_flow_run(root).state
        if state is not None and state.is_final():
            final_rounds += 1
            if final_rounds > 2:
                return state.type.value
        elif timeout_s is not None and time.monotonic() - started > timeout_s:
            return "TIMEOUT"
        sleep(poll_s if final_rounds == 0 else max(poll_s, 1.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.follow", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a deployment (flow/deployment) to run, or the id of a flow run to follow")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter of the new run (value as JSON, else text); repeatable")
    parser.add_argument("--params", help="parameters of the new run as one JSON object")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between reads of the API")
    parser.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds")
    args = parser.parse_args(argv)
    import httpx
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        print("error: PREFECT_API_URL is not set (run from the repository root: prefect.toml points at the "
              "local server, or export PREFECT_API_URL=http://HOST:4200/api)", file=sys.stderr)
        return 2
    try:
        if "/" in args.target:
            params = _parse_params(args.param, args.params)
            run_id = start_run(args.target, params)
            print(f"Created a flow run of {args.target}; UUID: {run_id}", flush=True)
        else:
            if args.param or args.params:
                raise ValueError("parameters are given with a deployment (flow/deployment), not with a flow run id")
            run_id = uuid.UUID(args.target)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ObjectNotFound:
        print(f"error: {args.target}: no such deployment (or flow run) on {api}; `prefect deployment ls` lists them",
              file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the Prefect API at {api} ({exc}); is the server running? (bash scripts/demo.sh "
              "starts the local one)", file=sys.stderr)
        return 2
    print(f"Prefect UI: {ui_address(str(api))}/runs/flow-run/{run_id}  (logs follow; Ctrl-C stops following, "
          f"not the run)", flush=True)
    try:
        final = follow(run_id, poll_s=args.poll, timeout_s=args.timeout)
    except KeyboardInterrupt:
        print(f"\nstopped following; the run goes on: {ui_address(str(api))}/runs/flow-run/{run_id}")
        return 130
    except httpx.HTTPError as exc:
        print(f"error: lost the Prefect API at {api} ({exc}); the run may go on: "
              f"{ui_address(str(api))}/runs/flow-run/{run_id}", file=sys.stderr)
        return 1
    print(f"flow run {run_id}: {final}", flush=True)
    return 0 if final == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
