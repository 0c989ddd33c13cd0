"""What rank 0 records about a training run, for people (TensorBoard), tables (Parquet) and Prefect (JSON).

Files in the run folder:

* ``metrics.parquet``: one row per logged step (``kind = "train"``: loss, lr, samples_per_s,
  data_wait = share of wall time spent waiting for the loader, memory_gib, non_finite) and one row
  per verification (``kind = "val"``, ``target``: accuracy, accuracy_std, val@far=1e-03, xnorm,
  tar@far=..., ``notes``; or only ``error`` for a target that could not be evaluated).
  Rewritten atomically (at most every ``flush_every_s`` seconds, at every evaluation
  and at the end); a resumed run first drops the rows written after its checkpoint.
* ``tensorboard/``: the same scalars as ``train/<name>`` and ``val/<target>/<name>``.
* ``status.json``: ``state`` (starting, running, evaluating, finished, stopped, failed), ``step``,
  ``total_steps``, ``epoch``, last ``loss``/``lr``/``samples_per_s``, ``eta_s``, ``best``,
  ``last_checkpoint``, ``checkpoints``, ``pid``, ``world_size``, ``updated`` (unix time), ``message``,
  ``eval_errors`` (``{target: reason}`` of the last evaluation, empty when it succeeded).
  Rewritten atomically at every log line, so a reader never sees a torn file; the write (with its
  fsyncs) happens on a background thread, the newest state wins, and ``close()`` waits for it, so the
  training loop never waits for the disk.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

# Imported here, not at first use: a second Ctrl-C landing inside a first-time import leaves a half-built
# module behind, and the record written on the way out would then fail with an unrelated error. pandas too,
# since pyarrow imports it on the first conversion.
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from datasets.atomic import atomic_paths, atomic_write_text

__all__ = ["RunRecorder", "METRICS_FILE", "STATUS_FILE", "read_status", "read_metrics"]

METRICS_FILE = "metrics.parquet"
STATUS_FILE = "status.json"
TENSORBOARD_DIR = "tensorboard"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def read_status(output: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``status.json`` as a dict, or None if it does not exist yet."""
    try:
        return json.loads((Path(output) / STATUS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def read_metrics(output: str | os.PathLike):
    """``metrics.parquet`` of a run as a pandas DataFrame (empty if none was written)."""
    path = Path(output) / METRICS_FILE
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


class RunRecorder:
    """Metrics of one run. Every method is a no-op unless ``enabled`` (rank 0)."""

    def __init__(self, output: str | os.PathLike, *, enabled: bool, total_steps: int, world_size: int,
                 resume_step: int | None = None, tensorboard: bool = True, flush_every_s: float = 30.0):
        self.output = Path(output)
        self.enabled = enabled
        self.total_steps = total_steps
        self.world_size = world_size
        self.flush_every_s = flush_every_s
        self.rows: list[dict[str, Any]] = []
        self.status_fields: dict[str, Any] = {"state": "starting", "step": resume_step or 0, "total_steps": total_steps,
                                              "world_size": world_size, "pid": os.getpid(), "best": None,
                                              "last_checkpoint": None, "checkpoints": []}
        self._last_flush = time.monotonic()
        self._writer = None
        self._status_cond = threading.Condition()
        self._status_text: str | None = None  # newest status not yet on disk
        self._status_busy = False
        self._status_thread: threading.Thread | None = None
        self._status_error: OSError | None = None
        if not enabled:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            old = read_metrics(self.output)
            if len(old):
                self.rows = [r for r in old.to_dict("records") if int(r["step"]) <= resume_step]
                self.rows = [{k: v for k, v in r.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
                             for r in self.rows]
            previous = read_status(self.output) or {}
            for key in ("best", "checkpoints"):
                if previous.get(key) is not None:
                    self.status_fields[key] = previous[key]
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(self.output / TENSORBOARD_DIR), purge_step=purge)

    # --- points ---------------------------------------------------------------------------------------------
    def train_point(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rows.append({"step": step, "epoch": epoch, "kind": "train", **{k: _clean(float(v)) for k, v in values.items()}})
        if self._writer is not None:
            for name, value in values.items():
                if value is not None and math.isfinite(float(value)):
                    self._writer.add_scalar(f"train/{name}", float(value), step)
        self.flush()

    def val_point(self, step: int, epoch: int, target: str, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: _clean(float(v)) for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
        texts = {k: row[k] for k in ("notes", "error") if isinstance(row.get(k), str) and row[k]}
        self.rows.append({"step": step, "epoch": epoch, "kind": "val", "target": target, **scalars, **texts})
        if self._writer is not None:
            for name, value in scalars.items():
                if value is not None and name not in ("n_pairs", "n_same", "n_diff", "nfolds"):
                    self._writer.add_scalar(f"val/{target}/{name}", value, step)

    # --- status ------------------------------------------------------------------------------------------------
    def status(self, **fields: Any) -> None:
        """Merge ``fields`` into the status and rewrite ``status.json``."""
        if not self.enabled:
            return
        self.status_fields.update({k: _clean(v) for k, v in fields.items()})
        self.status_fields["updated"] = time.time()
        text = json.dumps(self.status_fields, indent=1, default=str)
        with self._status_cond:
            self._status_text = text
            if self._status_thread is None:
                self._status_thread = threading.Thread(target=self._status_loop, name="status.json", daemon=True)
                self._status_thread.start()
            self._status_cond.notify_all()

    def _status_loop(self) -> None:
        while True:
            with self._status_cond:
                while self._status_text is None:
                    self._status_cond.wait()
                text, self._status_text = self._status_text, None
                self._status_busy = True
            try:
                atomic_write_text(self.output / STATUS_FILE, text)
            except OSError as exc:  # reported by wait_status(); training goes on
                self._status_error = exc
            with self._status_cond:
                self._status_busy = False
                self._status_cond.notify_all()

    def wait_status(self) -> None:
        """Block until the newest status is on disk; OSError if a write failed."""
        if not self.enabled:
            return
        with self._status_cond:
            while self._status_text is not None or self._status_busy:
                self._status_cond.wait()
        error, self._status_error = self._status_error, None
        if error is not None:
            raise error

    # --- files ---------------------------------------------------------------------------------------------------
    def flush(self, force: bool = False) -> None:
        """Rewrite ``metrics.parquet`` if ``force`` or ``flush_every_s`` passed since the last write."""
        if not self.enabled or not self.rows:
            return
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_every_s:
            return
        self._last_flush = now
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in self.rows])
        with atomic_paths(self.output / METRICS_FILE) as (tmp,):
            pq.write_table(table, tmp)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.wait_status()
        self.flush(force=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
