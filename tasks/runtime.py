"""What a stage function needs from its surroundings, with or without a Prefect run.

Stage logic is a plain function, callable from a notebook or ``python -m tasks.<stage>``. Inside a
Prefect flow or task run, the same calls log to the run and publish artifacts to the UI; outside
one they log through the standard ``logging`` module and artifacts are skipped.

Prefect is imported only by the stage modules and the flows: this module never imports it itself
(a process that has not imported prefect cannot be inside a Prefect run), so the engines
(:mod:`tasks.training`, :mod:`tasks.evaluation`, :mod:`tasks.alignment`) run where prefect is not
installed, e.g. on a bare CUDA image.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Sequence

_LOG = logging.getLogger("facepipe")


def _drop_prefect_exit_hooks() -> None:
    """In a forked child, forget the exit hooks of Prefect's log and event services.

    Prefect 3.8 registers ``threading`` exit hooks that drain its background services; in a forked
    child (a DataLoader worker) those services' threads do not exist, the hook fails an assertion and
    the child exits with code 1 ("DataLoader worker exited unexpectedly") once a flow has run in the
    parent. The parent keeps its hooks.
    """
    hooks = getattr(threading, "_threading_atexits", None)
    if hooks:
        hooks[:] = [h for h in hooks if not getattr(getattr(h, "func", h), "__module__", "").startswith("prefect")]


os.register_at_fork(after_in_child=_drop_prefect_exit_hooks)


def in_run() -> bool:
    """True inside a Prefect flow or task run."""
    context = sys.modules.get("prefect.context")
    if context is None:
        return False
    return context.TaskRunContext.get() is not None or context.FlowRunContext.get() is not None


def logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run, the ``facepipe`` logger otherwise."""
    if in_run():
        from prefect import get_run_logger

        return get_run_logger()
    return _LOG


def skipped(data: Any, message: str) -> Any:
    """A Completed state named "Skipped" carrying ``data`` as its result (shown as Skipped in the UI)."""
    from prefect.states import Completed

    return Completed(name="Skipped", message=message, data=data)


def finished(result: Any, message: str = "up to date") -> Any:
    """What a stage task returns: ``result`` itself, or :func:`skipped` carrying it when the stage
    found its outputs up to date (``result.skipped`` is true)."""
    return skipped(result, message) if getattr(result, "skipped", False) else result


def artifact_key(text: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:100] or "facepipe"


def publish_table(key: str, rows: Sequence[dict[str, Any]], description: str = "") -> None:
    """A table artifact in the UI (no-op outside a run)."""
    if not in_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(table=[dict(r) for r in rows], key=artifact_key(key), description=description)


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    """A markdown artifact in the UI (no-op outside a run). Images can be embedded as data URIs."""
    if not in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


class Progress:
    """Progress of a long loop: a progress artifact in the UI and a log line at most every
    ``log_every_s`` seconds. ``update(done)`` with the number of items finished so far."""

    def __init__(self, key: str, total: int, description: str = "", log_every_s: float = 10.0):
        self.total = max(int(total), 0)
        self.description = description or key
        self.log_every_s = log_every_s
        self._start = time.monotonic()
        self._last_log = 0.0
        self._artifact_id = None
        if in_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(
                progress=0.0, key=artifact_key(key), description=self.description
            )

    def update(self, done: int) -> None:
        pct = 100.0 if self.total == 0 else min(100.0, 100.0 * done / self.total)
        if self._artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(artifact_id=self._artifact_id, progress=pct)
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s or done >= self.total:
            self._last_log = now
            elapsed = now - self._start
            rate = done / elapsed if elapsed > 0 else 0.0
            left = format_duration((self.total - done) / rate) if rate > 0 and done < self.total else "0s"
            logger().info("%s: %d/%d (%.0f%%), %.1f items/s, %s left", self.description, done, self.total, pct,
                          rate, left)


def format_duration(seconds: float) -> str:
    """``"1h02m"``, ``"4m05s"`` or ``"7s"``."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
