"""tasks.runtime: helpers that work inside and outside a Prefect run."""
from __future__ import annotations

import torch
from prefect import flow, task
from torch.utils.data import DataLoader, Dataset

from tasks import runtime


class _Numbers(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.tensor(i)


@task
def _skipping_task():
    return runtime.skipped({"n": 3}, "up to date")


@flow
def _flow_with_skip():
    state = _skipping_task(return_state=True)
    return state.name, state.result()


def test_outside_a_run_logs_and_skips_artifacts():
    assert not runtime.in_run()
    runtime.publish_table("t", [{"a": 1}])  # no server, no run: must be a no-op
    progress = runtime.Progress("align progress", total=2)
    progress.update(2)
    assert runtime.artifact_key("Build dataset: counts!") == "build-dataset-counts"


def test_skipped_state_and_forked_workers_after_a_flow(prefect_server):
    assert _flow_with_skip() == ("Skipped", {"n": 3})
    # Prefect's service exit hooks used to kill every forked DataLoader worker after a flow ran here.
    batches = list(DataLoader(_Numbers(), batch_size=3, num_workers=2))
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
