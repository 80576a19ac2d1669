"""Loss histories as a CSV table and a log-scale plot (bytes, ready to store)."""

from __future__ import annotations

import csv
import io
import math
import threading

# matplotlib's text layout (pyparsing) is not thread-safe; tasks plot from several threads.
_PLOT_LOCK = threading.Lock()


def columns(history: list[dict[str, float]]) -> list[str]:
    """``iteration, total, content, style, tv, style:<layer>...`` in a stable order."""
    if not history:
        return ["iteration", "total", "content", "style", "tv"]
    return list(history[0].keys())


def loss_columns(history: list[dict[str, float]]) -> list[str]:
    """The loss terms (not ``iteration`` nor the coarse-to-fine stage's ``size``)."""
    return [c for c in columns(history) if c not in ("iteration", "size")]


def to_csv(history: list[dict[str, float]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(history), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue().encode("utf-8")


def to_png(history: list[dict[str, float]], title: str = "loss") -> bytes:
    """One line per term (weighted total and the unweighted terms), log scale."""
    with _PLOT_LOCK:
        return _plot(history, title)


def _plot(history: list[dict[str, float]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # the OO API: no global pyplot state, thread-safe

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    iterations = [row["iteration"] for row in history]
    for name in loss_columns(history):
        values = [row[name] for row in history]
        if any(v > 0 and math.isfinite(v) for v in values):
            style = "-" if ":" not in name else ":"
            ax.plot(iterations, [v if v > 0 else math.nan for v in values], style, label=name, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("iteration (loss evaluations)")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
