"""Reading runs, task states and artifacts back from the Prefect API in tests."""
from __future__ import annotations

import time


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def runs_below(client, flow_run_id) -> list:
    """The flow run and its subflow runs (one level deep)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    return [client.read_flow_run(flow_run_id), *children]


def task_states(client, flow_run_ids) -> dict[str, str]:
    """``{task run name: state name}`` once every task run reports a final state (updates are batched)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))
        if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            return {r.name: r.state.name for r in runs}
        time.sleep(0.5)


def artifacts(client, flow_run_ids) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=list(flow_run_ids))))
    return {a.key: a for a in found}
