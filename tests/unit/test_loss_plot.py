"""The loss history's plot (``nst_core.history.to_png``): every item of a run stores one.

A title too long for the plot (a long row id, a weights file's sha256) is set on two lines, each
cut in its middle, so both ends of an id stay readable; the figure keeps its size either way.
"""

from __future__ import annotations

import io

from PIL import Image

from nst_core import history

ROWS = [{"iteration": i, "total": 10 / i, "content": 1 / i, "style": 5 / i, "tv": 0.0} for i in range(1, 41)]


def test_a_plot_is_a_png_of_one_size_whatever_its_title():
    sizes = set()
    for title in ("tubingen-starry  weights=random:0", "row-" + "x" * 90 + "  weights=sha256:" + "ab" * 32):
        with Image.open(io.BytesIO(history.to_png(ROWS, title))) as plot:
            assert plot.format == "PNG"
            sizes.add(plot.size)
    assert sizes == {(600, 360)}


def _title_columns(png: bytes) -> tuple[int, int]:
    """The leftmost and rightmost columns of dark pixels above the axes (the title), and the figure's width."""
    import numpy as np

    with Image.open(io.BytesIO(png)) as plot:
        dark = np.asarray(plot.convert("L")) < 128
    frame = next(r for r in range(dark.shape[0]) if dark[r, 200:400].all())  # the axes' top edge: a solid line
    columns = np.flatnonzero(dark[:frame].any(axis=0))
    return int(columns.min()), int(columns.max())


def test_a_long_title_stays_inside_the_figure():
    """Ids and hashes of the widest common characters (hex digits, lowercase letters), as long as an
    id may be: the title's pixels keep clear of the figure's edges (before: a 64-character line,
    centred over the axes, ran off the right edge)."""
    for title in ("row-" + "0123456789abcdef" * 12 + "  weights=sha256:" + "ab" * 32, "d" * 200, "tubingen-starry  weights=random:0"):
        left, right = _title_columns(history.to_png(ROWS, title))
        assert left >= 4 and right <= 600 - 5, (title[:30], left, right)


def test_a_long_title_part_keeps_both_ends():
    weights = "weights=sha256:" + "0123456789abcdef" * 4
    short = history._abridged(weights)
    assert len(short) == history._TITLE_CHARS - 1
    assert short.startswith("weights=sha256:0123") and short.endswith("89abcdef") and "\u2026" in short
    assert history._abridged("tubingen-starry") == "tubingen-starry"
