"""Plots of evaluation results for the artifacts (matplotlib, Agg canvas: no display needed)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from datasets.atomic import atomic_write_bytes

__all__ = ["plot_roc"]


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str = "") -> Path:
    """PNG of TAR against FAR (log axis, 1e-6 ... 1), one step curve per ``{name: (far, tar)}``.
    Points with FAR 0 cannot be drawn on the log axis and are left out. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lowest = 1.0
    for name, (far, tar) in curves.items():
        far, tar = np.asarray(far, np.float64), np.asarray(tar, np.float64)
        keep = far > 0
        if keep.any():
            lowest = min(lowest, float(far[keep].min()))
            ax.step(far[keep], tar[keep], where="post", label=name, linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlim(min(1e-6, lowest), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.grid(True, which="major", alpha=0.35)
    if title:
        ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
