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


_TITLE_CHARS = 58
"""Characters of a title line that fit in the figure, centred over the axes at its font size: measured
with the widest of an id's usual characters (hex digits, lowercase letters), 58 end 16 px inside the
figure's right edge; 64 ran off it (``tests/unit/test_loss_plot.py``)."""


def _abridged(text: str) -> str:
    """``text`` cut to :data:`_TITLE_CHARS` by an ellipsis in its middle (both ends of an id stay)."""
    if len(text) <= _TITLE_CHARS:
        return text
    half = (_TITLE_CHARS - 1) // 2
    return text[:half] + "\u2026" + text[-half:]


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
    lines = [_abridged(part) for part in title.split("  ")] if len(title) > _TITLE_CHARS else [title]
    ax.set_title("\n".join(lines), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    # Fixed margins, fitted to this figure's size and fonts: ``tight_layout`` measured every tick label
    # in an extra draw, 40 % of a plot's time (230 against 138 ms for a 220-iteration history; every
    # item of a run plots one, on the task's own time).
    fig.subplots_adjust(left=0.11, right=0.98, top=0.96 - 0.05 * len(lines), bottom=0.14)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
