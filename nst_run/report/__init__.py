"""The run report: one static HTML page per run, rebuilt from stored metadata alone.

``build_report(run_uri)`` reads a run folder (``results.parquet``,
``summary.json``, each item's ``meta.json`` and ``loss.csv``, the decisions
under ``decisions/``) and writes, beside them::

    {run}/report.html                                     the page: header, controls, the first cards, the index's first part
    {run}/report-files/index-<sha256>.js                  the rest of the index (what sorting and filtering read)
    {run}/report-files/cards-<sha256>.js                  the rest of the cards, PAGE_ROWS a script
    {run}/thumbs/in-<sha256 of the input file>-<px>.jpg    content and style thumbnails
    {run}/thumbs/out-<item id>-<px>.jpg                   output thumbnails

Thumbnail and data-script names are content addresses: an input used by a
hundred rows is thumbnailed once, and a rebuild only writes what is missing
(and deletes the data scripts the new page no longer names). The page links
them relatively and loads nothing else (its Content Security Policy allows no
network access, its own inline script and style by hash, and scripts and
images from 'self': the files beside it), so any copy of the run folder, local
or synced from S3, opens as is, from file:// with no server. A page on
file:// cannot fetch() its neighbours but may load scripts beside it, so the
data are scripts that hand their part to the page's script. No file is over
MAX_FILE_BYTES and the build's memory does not grow with the run (the results
are read in batches, twice: see :func:`build_report`; what is kept per item is on
disk: :class:`_Scratch`). Every value that came from a manifest (ids, ``meta_*`` cells, URIs,
errors) is HTML-escaped, and every URI is passed through
:func:`nst_core.storage.sanitize_uri`: no query string, so no presigned URL or
credential, is ever written.

One card per manifest row (the first VIEW_ROWS on the page, more on demand): content, style and output thumbnails, the loss
curve (inline SVG from ``loss.csv``), the parameters that differ from the
run's defaults, the final loss terms, the quality score (style and content
distances judged by a VGG-19 with other weights; lower is better), duration,
status, error and the reviewers' decisions; a click on an image opens it at
full size. The page sorts and filters all rows by status, style, parameter,
decision, loss and score, and lets a reviewer mark
keep/reject on the cards and save the marks as a file for
``nst review RUN --from-file FILE``.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import functools
import hashlib
import html
import io
import json
import math
import os
import re
import sqlite3
import tempfile
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from nst_core import storage
from nst_core.params import EXECUTION_FIELDS
from nst_run import paths
from nst_run.paths import REPORT_FILE, REPORT_FILES_DIR, THUMBS_DIR
from nst_run.results import Run, finite_number, iter_rows, open_run_header, run_folder
from nst_run.review import BULK_FORMAT, VERDICTS, Decision, latest_per_reviewer, load_decisions, verdict
from nst_run.status import ALWAYS_SHOWN_STATUSES, DONE_STATUSES, STATUSES

INPUT_THUMB_PX = 240
OUTPUT_THUMB_PX = 480
# Parameters that never change an output: not compared, not filtered on.
_IGNORED_PARAMS = EXECUTION_FIELDS
_CURVE_TERMS = ("total", "content", "style", "tv")
# A loss curve is drawn from at most this many points (evenly spaced, first and last kept): the plot is ~310 px wide.
CURVE_POINTS = 60

# The page and its data scripts (report-files/, beside it): the page shows the first VIEW_ROWS cards and
# carries the first part of the index; the rest of the cards are in scripts of PAGE_ROWS cards, loaded when
# a view needs them; no file is larger than MAX_FILE_BYTES. BATCH_ROWS results rows are in memory at a time.
VIEW_ROWS = 48
PAGE_ROWS = 24
MAX_FILE_BYTES = 4_000_000
BATCH_ROWS = 2_000
DATA_DIR = REPORT_FILES_DIR  # named in nst_run.paths with every stored path
_DATA_NAME = re.compile(r"^(cards|index)-[0-9a-f]{20}\.js$")
# The index keeps this many leading digits of an item id for the search box (a longer query is matched on them).
INDEX_ITEM_CHARS = 12
# At most this many values of one parameter are offered as filters (all of them sort).
MAX_FILTER_VALUES = 200
# SQLite's page cache for the build's per-item bookkeeping (:class:`_Scratch`), in KiB.
SCRATCH_CACHE_KIB = 2048


# --------------------------------------------------------------------------- values


def fmt_num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def fmt_param(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return "|".join(fmt_param(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _basename(uri: str | None) -> str:
    if not uri:
        return ""
    return storage.sanitize_uri(uri).rstrip("/").rsplit("/", 1)[-1]


def _data_json(data: Any) -> str:
    """JSON for a data script loaded by ``<script src>``: no HTML parser reads it, so only U+2028/U+2029 are escaped."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _script_json(data: Any) -> str:
    """JSON safe to embed in a ``<script type="application/json">`` element."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


# --------------------------------------------------------------------------- per-item bookkeeping


class _Scratch:
    """The build's bookkeeping per item (items seen, device seconds, thumbnails present), in SQLite in a temporary folder.

    Held in Python sets and dicts it cost some 0.3 KB per row, the part of the build's memory that grew
    with any row count; on disk, behind SQLite's page cache (SCRATCH_CACHE_KIB), it does not. One
    connection, one lock: the build's threads may share it.
    """

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="nst-report-")
        self._db = sqlite3.connect(os.path.join(self._folder.name, "scratch.sqlite"), isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{SCRATCH_CACHE_KIB}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._lock = threading.Lock()
        self._tables = 0

    def keys(self) -> _Keys:
        """A new, empty set of keys (each with a number)."""
        with self._lock:
            self._tables += 1
            table = f"keys{self._tables}"
            self._db.execute(f"CREATE TABLE {table} (key TEXT PRIMARY KEY, value REAL) WITHOUT ROWID")
        return _Keys(self, table)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def executemany(self, sql: str, rows: Any) -> None:
        with self._lock:
            self._db.executemany(sql, rows)

    def close(self) -> None:
        self._db.close()
        self._folder.cleanup()


class _Keys:
    """A set of strings on disk (:class:`_Scratch`), each with a number: what ``set`` and ``dict[str, float]`` did."""

    def __init__(self, scratch: _Scratch, table: str):
        self._scratch, self._table = scratch, table

    def add(self, key: str) -> bool:
        """Add ``key``; True when it was not there yet."""
        return self._scratch.execute(f"INSERT OR IGNORE INTO {self._table} (key) VALUES (?)", key).rowcount == 1

    def update(self, keys: Iterable[str]) -> None:
        self._scratch.executemany(f"INSERT OR IGNORE INTO {self._table} (key) VALUES (?)", ((k,) for k in keys))

    def put(self, key: str, value: float) -> None:
        """Set ``key``'s number (a later one replaces an earlier one)."""
        self._scratch.execute(f"INSERT OR REPLACE INTO {self._table} (key, value) VALUES (?, ?)", key, value)

    def __contains__(self, key: object) -> bool:
        return self._scratch.execute(f"SELECT 1 FROM {self._table} WHERE key = ?", key).fetchone() is not None

    def __len__(self) -> int:
        return int(self._scratch.execute(f"SELECT count(*) FROM {self._table}").fetchone()[0])

    def total(self) -> float:
        """The sum of the keys' numbers."""
        return float(self._scratch.execute(f"SELECT total(value) FROM {self._table}").fetchone()[0])


# --------------------------------------------------------------------------- thumbnails


def thumbnail_bytes(data: bytes, max_side: int, name: str = "image", max_pixels: int = 200_000_000) -> bytes:
    """A JPEG thumbnail (long side at most ``max_side``, never enlarged) of any image Pillow reads."""
    from PIL import Image

    from nst_core.images import load_image

    image = load_image(data, name=name, max_pixels=max_pixels)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85, optimize=True)
    return buffer.getvalue()


class _Thumbs:
    """Makes the thumbnails a report needs, once each, into ``{dest}/thumbs/``."""

    def __init__(self, dest: str, scratch: _Scratch):
        self.dest = dest
        prefix = storage.join(dest, THUMBS_DIR) + "/"
        self.present = scratch.keys()  # thumbnail names: one per output image, so on disk
        try:
            self.present.update(u.rsplit("/", 1)[-1] for u in storage.list_prefix(prefix))
        except storage.StorageError:
            pass

    def _write(self, name: str, source_uri: str, max_side: int, data: bytes | None = None) -> str | None:
        rel = f"{THUMBS_DIR}/{name}"
        if name in self.present:
            return rel
        try:
            raw = data if data is not None else storage.read_bytes(source_uri)
            thumb = thumbnail_bytes(raw, max_side, name=storage.sanitize_uri(source_uri))
            storage.write_bytes(storage.join(self.dest, THUMBS_DIR, name), thumb, "image/jpeg")
        except Exception:  # noqa: BLE001 - a missing or broken image gets a placeholder, never fails the report
            return None
        self.present.add(name)
        return rel

    def output(self, item_id: str, image_uri: str) -> str | None:
        return self._write(paths.output_thumb_name(item_id, OUTPUT_THUMB_PX), image_uri, OUTPUT_THUMB_PX)

    def input(self, sha256: str | None, uri: str | None) -> str | None:
        if not uri:
            return None
        if sha256:
            return self._write(paths.input_thumb_name(sha256, INPUT_THUMB_PX), uri, INPUT_THUMB_PX)
        try:  # a row without meta.json (failed): hash the file to name its thumbnail
            data = storage.read_bytes(uri)
        except Exception:  # noqa: BLE001
            return None
        digest = storage.sha256_bytes(data)
        return self._write(paths.input_thumb_name(digest, INPUT_THUMB_PX), uri, INPUT_THUMB_PX, data)


# --------------------------------------------------------------------------- loss curves


def read_loss_csv(data: bytes) -> list[dict[str, float]]:
    rows = []
    for record in csv.DictReader(io.StringIO(data.decode("utf-8", "replace"))):
        row = {}
        for key, value in record.items():
            number = finite_number(value)
            if key is not None and number is not None:
                row[key] = number
        if "iteration" in row:
            rows.append(row)
    return rows


def _tick(value: float) -> str:
    return f"{value:.3g}" if 0.01 <= value < 10_000 else f"{value:.1e}"


def loss_svg(history: list[dict[str, float]], width: int = 360, height: int = 104) -> str:
    """The loss terms on a log scale as a small inline SVG (numbers only: nothing to escape)."""
    if not history:
        return '<p class="nocurve">no loss curve</p>'
    if len(history) > CURVE_POINTS:
        last = len(history) - 1
        history = [history[round(k * last / (CURVE_POINTS - 1))] for k in range(CURVE_POINTS)]
    left, right, top, bottom = 44, 6, 15, 16
    xs = [row["iteration"] for row in history]
    values = [row[t] for row in history for t in _CURVE_TERMS if row.get(t, 0) > 0]
    if not values:
        return '<p class="nocurve">loss is zero</p>'
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = min(xs), max(xs)
    span = (x1 - x0) or 1.0

    def px(x: float) -> float:
        return left + (x - x0) / span * (width - left - right)

    def py(v: float) -> float:
        return top + (hi - math.log10(v)) / (hi - lo) * (height - top - bottom)

    parts = [
        f'<svg class="curve" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="loss curve, log scale">',
        f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/>',
        f'<text class="tick" x="{left - 3}" y="{top + 4}" text-anchor="end">{_tick(10 ** hi)}</text>',
        f'<text class="tick" x="{left - 3}" y="{height - bottom}" text-anchor="end">{_tick(10 ** lo)}</text>',
        f'<text class="tick" x="{left}" y="{height - 4}">{x0:g}</text>',
        f'<text class="tick" x="{width - right}" y="{height - 4}" text-anchor="end">{x1:g} it</text>',
    ]
    label_x = width - right - 4
    for term in reversed(_CURVE_TERMS):
        if any(row.get(term, 0) > 0 for row in history):
            parts.append(f'<text class="key k-{term}" x="{label_x}" y="{top - 5}" text-anchor="end">{term}</text>')
            label_x -= 8 + 6 * len(term)
    for term in _CURVE_TERMS:
        points = [(px(row["iteration"]), py(row[term])) for row in history if row.get(term, 0) > 0]
        if len(points) == 1:
            cx, cy = points[0]
            parts.append(f'<circle class="l-{term}" cx="{cx:.1f}" cy="{cy:.1f}" r="2"/>')
        elif points:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline class="l-{term}" points="{coords}"/>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- gathering


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        value = json.loads(storage.read_bytes(uri))
    except (storage.StorageError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_curve(uri: str) -> str:
    """The loss curve of ``loss.csv`` at ``uri`` as :func:`loss_svg` draws it (a missing or unreadable file: no curve).

    Only the drawing is kept: the history's points (a dict and floats each) live no longer than this call.
    """
    try:
        history = read_loss_csv(storage.read_bytes(uri))
    except (storage.StorageError, ValueError):
        history = []
    return loss_svg(history)


def _builtin_defaults() -> dict[str, Any]:
    try:
        from nst_core.params import StyleParams

        return StyleParams().model_dump(mode="json")
    except Exception:  # noqa: BLE001 - highlighting only
        return {}


def _weights_note(weights: Counter[str]) -> str:
    random = sorted(w for w in weights if w.startswith("random:"))
    if not random:
        return ""
    return (
        f"UNTRAINED RANDOM WEIGHTS ({', '.join(random)}): these outputs come from a VGG-19 that was never trained. "
        "They show the pipeline working, not ImageNet-quality style transfer; do not publish them as such."
    )


class _RunFacts:
    """What the header, the controls and every card need from the whole run, gathered in a first pass over its rows.

    Everything here is counted per distinct item (rows sharing an item count it once) or per row, and is
    bounded by the run's distinct values, never by its rows' contents: no row, meta.json or card is kept.
    """

    def __init__(self, verdict_of: dict[str, str], scratch: _Scratch) -> None:
        self.verdict_of = verdict_of
        self.total = 0
        self.counts: Counter[str] = Counter()
        # Per item, so on disk (:class:`_Scratch`): the rest is bounded by the run's distinct values.
        self.items = scratch.keys()  # items of the rows with an output image
        self.verdicts: Counter[str] = Counter()  # each of those items' verdict
        self.every: dict[str, Counter[str]] = {}  # each parameter's values over the run's items (canonical JSON)
        self.blank: dict[str, Counter[str]] = {}  # the same, over the items whose row left the parameter blank
        self.computed = scratch.keys()  # device seconds of each item this run computed
        self.devices: Counter[str] = Counter()
        self.weights: Counter[str] = Counter()
        self.judges: Counter[str] = Counter()
        self.style_labels: dict[str, str] = {}
        self.style_rows: Counter[str] = Counter()

    def add(self, row: dict[str, Any], meta: dict[str, Any] | None) -> None:
        """Count one row (``meta``: its item's ``meta.json`` when it has an output image and the file was read)."""
        self.total += 1
        status = str(row.get("status"))
        self.counts[status] += 1
        item = str(row.get("item_id") or "")
        if row.get("weights_id"):
            self.weights[str(row["weights_id"])] += 1
        style = storage.sanitize_uri(row.get("style_uri") or "")
        if style:
            self.style_labels.setdefault(style, _basename(style))
            self.style_rows[style] += 1
        if status == "succeeded" and item:
            self.computed.put(item, finite_number((meta or {}).get("wall_time_s")) or finite_number(row.get("duration_s")) or 0.0)
        if status not in DONE_STATUSES or not item or not self.items.add(item):
            return
        self.verdicts[self.verdict_of.get(item, "undecided")] += 1
        if meta is None:
            return
        given = meta.get("row") or {}
        for name, value in (meta.get("params") or {}).items():
            if name in _IGNORED_PARAMS:
                continue
            key = _canon(value)
            self.every.setdefault(name, Counter())[key] += 1
            if name not in given:
                self.blank.setdefault(name, Counter())[key] += 1
        if meta.get("device"):
            self.devices[str(meta["device"])] += 1
        judge = (meta.get("quality") or {}).get("judge_weights")
        if judge:
            self.judges[str(judge)] += 1

    def defaults(self) -> dict[str, Any]:
        """Each parameter's run default: its value in items whose row left it blank, else its most common value."""
        return {name: json.loads((self.blank.get(name) or counts).most_common(1)[0][0]) for name, counts in self.every.items()}

    def varying(self) -> list[str]:
        """Parameters with more than one value in this run: shown on every card, filterable, sortable."""
        return sorted(name for name, counts in self.every.items() if len(counts) > 1)

    def styles(self) -> dict[str, str]:
        """Each style URI's label: its file name, or the whole URI when two styles share a file name."""
        if len(set(self.style_labels.values())) < len(self.style_labels):
            return {uri: uri for uri in self.style_labels}
        return dict(self.style_labels)


def _value_order(canon: str) -> tuple[int, float, str]:
    """Parameter values in order: numbers by value, then anything else by its JSON text."""
    value = json.loads(canon)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0, float(value), canon
    return 1, 0.0, canon


def _index_number(value: float | None) -> float | None:
    """A number as the index keeps it: 6 significant digits (sorting and ``<=`` filters need no more)."""
    return None if value is None else float(f"{value:.6g}")


def _relative_link(target: str | None, dest: str) -> str | None:
    """A link from the page in ``dest`` to a local file, or None (S3 objects: a page on file:// cannot reach them)."""
    if not target or not storage.is_local(target) or not storage.is_local(dest):
        return None
    target_path, dest_path = storage.parse_uri(target).path, storage.parse_uri(dest).path
    assert target_path is not None and dest_path is not None
    return urllib.parse.quote(os.path.relpath(target_path.absolute(), dest_path.absolute()).replace(os.sep, "/"))


class _RunView:
    """One row as the page shows it: its card and its entry in the index that sorting and filtering use.

    The index entry is a list, positions as ``static/report.js`` reads them
    (``I_ID`` ...): id, status code, style code, verdict code, loss total,
    style distance, content distance, duration, the codes of the varying
    parameters' values, the lower-case text the search box looks in. Codes index
    the lists the page carries (:meth:`dictionaries`): statuses, styles, verdicts
    and each varying parameter's values in their order, so sorting by a code is
    sorting by the value.
    """

    def __init__(self, run: Run, facts: _RunFacts, verdict_of: dict[str, str], dest: str):
        self.run, self.facts, self.verdict_of, self.dest = run, facts, verdict_of, dest
        self.defaults = facts.defaults()
        self.default_canon = {name: _canon(value) for name, value in self.defaults.items()}
        self.links: dict[str | None, str | None] = {}  # input URI -> link (inputs repeat across rows)
        self.varying = facts.varying()
        self.style_codes = {uri: code for code, uri in enumerate(sorted(facts.style_labels))}
        self.status_codes = {status: code for code, status in enumerate(STATUSES)}
        self.verdict_codes = {v: code for code, v in enumerate(("", *VERDICTS))}
        self.param_values = {name: sorted(facts.every[name], key=_value_order) for name in self.varying}
        self.param_codes = {name: {v: code for code, v in enumerate(values)} for name, values in self.param_values.items()}

    def dictionaries(self) -> dict[str, Any]:
        return {
            "statuses": list(STATUSES), "styles": sorted(self.facts.style_labels), "verdicts": ["", *VERDICTS],
            "params": [[name, self.param_values[name]] for name in self.varying], "item_chars": INDEX_ITEM_CHARS,
        }  # fmt: skip

    def full_links(self, item: str, meta: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, str | None]:
        """Where a click on each image opens it at full size, relative to the page (None: the thumbnail is all there is).

        The output: in the stored layout, two folders up (``../../items/<id>/<image>``) when the page is in the run folder.
        The inputs: local files, linked relatively.
        """
        links: dict[str, str | None] = {"output": None, "content": None, "style": None}
        if meta:
            image = (meta.get("outputs") or {}).get("image") or paths.image_name()
            if self.dest == self.run.folder and self.run.item_folder(item) and "/" not in image and image not in (".", ".."):
                links["output"] = f"../../{paths.ITEMS_DIR}/{item}/{urllib.parse.quote(image)}"
        inputs = (meta or {}).get("inputs") or {}
        for role in ("content", "style"):
            uri = (inputs.get(role) or {}).get("uri") or row.get(f"{role}_uri")
            if uri not in self.links:
                self.links[uri] = _relative_link(uri, self.dest)
            links[role] = self.links[uri]
        return links

    def row(
        self, index: int, row: dict[str, Any], meta: dict[str, Any] | None, curve: str,
        found: dict[str, str | None], decisions: dict[str, list[Decision]],
    ) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
        """(index entry, card) of the ``index``-th row; ``meta``/``curve``: its item's (:func:`_read_curve`), when it has an output image."""
        item = str(row.get("item_id") or "")
        params = (meta or {}).get("params") or {}
        status = str(row.get("status") or "")
        style_uri = storage.sanitize_uri(row.get("style_uri") or "")
        content_uri = storage.sanitize_uri(row.get("content_uri") or "")
        item_decisions = decisions.get(item, []) if meta else []
        row_verdict = self.verdict_of.get(item, "undecided") if meta else ""
        losses = (meta or {}).get("final_losses") or {}
        quality = (meta or {}).get("quality") or {}
        sd = finite_number(quality.get("style_distance", row.get("style_distance")))
        cd = finite_number(quality.get("content_distance", row.get("content_distance")))
        total = finite_number(losses.get("total", row.get("loss_total")))
        duration = finite_number((meta or {}).get("wall_time_s", row.get("duration_s")))
        meta_cells = {k: v for k, v in row.items() if k.startswith("meta_") and v not in (None, "")}
        defaults = self.defaults
        diff = {n: v for n, v in params.items() if n in self.default_canon and _canon(v) != self.default_canon[n]}
        shown_params = {n: params[n] for n in self.varying if n in params}
        search = " ".join(
            str(x) for x in (row.get("id"), item[:INDEX_ITEM_CHARS] if meta else "", row.get("error"), _basename(content_uri), _basename(style_uri),
                             *meta_cells.values()) if x
        ).lower()  # fmt: skip
        entry = [
            str(row.get("id") or ""), self.status_codes.get(status, -1), self.style_codes.get(style_uri, -1),
            self.verdict_codes.get(row_verdict, 0), _index_number(total), _index_number(sd), _index_number(cd), _index_number(duration),
            [self.param_codes[n].get(_canon(shown_params[n]), -1) if n in shown_params else -1 for n in self.varying], search,
        ]  # fmt: skip
        full = self.full_links(item, meta, row) if status != "invalid" else {}
        figures = [
            {"src": found.get("output"), "full": full.get("output"), "role": "output", "caption": f"{params.get('size', '')} px" if params else status, "title": item},
            {"src": found.get("content"), "full": full.get("content"), "role": "content", "caption": _basename(content_uri), "title": content_uri},
            {"src": found.get("style"), "full": full.get("style"), "role": "style", "caption": _basename(style_uri), "title": style_uri},
        ]  # fmt: skip
        chips = [
            {
                "name": name, "value": fmt_param(params.get(name)), "diff": name in diff,
                "tip": f"run default: {fmt_param(defaults.get(name))}" if name in diff else "as the run default",
            }
            for name in sorted(set(diff) | set(shown_params))
        ]  # fmt: skip
        card = {
            "index": index, "row": row.get("row"), "id": row.get("id"), "status": status, "item": item,
            "verdict": row_verdict if row_verdict != "undecided" else "",
            "figures": figures if status != "invalid" else [],
            "meta": bool(meta), "curve": Markup(curve) if meta else "",
            "judge": quality.get("judge_weights"), "sd": fmt_num(sd, 3), "cd": fmt_num(cd, 3), "total": fmt_num(total, 4),
            "content": fmt_num(finite_number(losses.get("content")), 3), "style": fmt_num(finite_number(losses.get("style")), 3),
            "time": fmt_duration(duration), "chips": chips,
            "meta_cells": [(k.removeprefix("meta_"), v) for k, v in sorted(meta_cells.items())],
            "error": row.get("error"),
            "decisions": item_decisions, "latest": latest_per_reviewer(item_decisions),
            "iterations": (meta or {}).get("iterations"), "device": (meta or {}).get("device"),
        }  # fmt: skip
        return entry, card


class _DataFiles:
    """The page's data scripts in ``{dest}/report-files/``: content-addressed, written once, the unused ones pruned.

    A script is ``nstReport.<kind>(<first row>,<JSON list>);``: loaded by a
    ``<script src>`` the page adds (a page on file:// may load scripts beside
    it, never fetch() them), it hands its part of the index or its cards to the
    page's own script.
    """

    def __init__(self, dest: str):
        self.dest = dest
        self.folder = storage.join(dest, DATA_DIR)
        try:
            self.present = {u.rsplit("/", 1)[-1] for u in storage.list_prefix(self.folder + "/")}
        except storage.StorageError:
            self.present = set()
        self.used: set[str] = set()

    def write(self, kind: str, start: int, body: bytes) -> str:
        text = f"nstReport.{kind}({start},".encode() + body + b");\n"
        name = f"{kind}-{hashlib.sha256(text).hexdigest()[:20]}.js"
        if name not in self.present:
            storage.write_bytes(storage.join(self.folder, name), text, "text/javascript; charset=utf-8")
            self.present.add(name)
        self.used.add(name)
        return name

    def prune(self) -> None:
        """Delete the data scripts of earlier builds (after the page that names this build's is written)."""
        for name in sorted(self.present - self.used):
            if _DATA_NAME.match(name):
                storage.delete(storage.join(self.folder, name))


class _Pages:
    """Items (cards, index entries) cut into parts: the first stays in the page, the rest go to data scripts.

    A part holds at most ``rows`` items and ``max_bytes`` bytes of JSON (one
    larger item is a part of its own); the page gets ``first_rows`` items and
    ``first_bytes`` bytes. ``parts`` lists ``[script name or None, first item]``.
    """

    def __init__(
        self, kind: str, files: _DataFiles, encode: Callable[[Any], str], *, rows: int, max_bytes: int, first_rows: int, first_bytes: int
    ):  # fmt: skip
        self.kind, self.files, self.encode = kind, files, encode
        self.rows, self.max_bytes, self.first_rows, self.first_bytes = rows, max_bytes, first_rows, first_bytes
        self.first: list[Any] = []
        self.parts: list[list[Any]] = []
        self._items: list[Any] = []
        # A script's part is its JSON list as it grows, in one buffer: no object per item is kept (an index
        # part holds some 30,000 entries, and small objects that outlive many batches fragment the heap).
        self._body = bytearray()
        self._count = 0
        self._start = 0

    def add(self, index: int, item: Any) -> None:
        piece = self.encode(item).encode("utf-8")
        size = len(piece) + 1
        inline = not self.parts
        rows, limit = (self.first_rows, self.first_bytes) if inline else (self.rows, self.max_bytes)
        if self._count and (self._count >= rows or len(self._body) + size > limit):
            self._flush()
        if not self._count:
            self._start = index
        self._body += b"," if self._count else b"["
        self._body += piece
        self._count += 1
        if inline:  # only the page's part keeps its items; a script's part keeps their JSON text alone
            self._items.append(item)

    def _flush(self) -> None:
        if not self.parts:
            self.first = self._items
            self.parts.append([None, self._start])
        else:
            self.parts.append([self.files.write(self.kind, self._start, bytes(self._body + b"]")), self._start])
        self._items, self._body, self._count = [], bytearray(), 0

    def finish(self) -> None:
        if self._count or not self.parts:
            self._flush()


def _load_items(pool: ThreadPoolExecutor, run: Run, rows: list[dict[str, Any]], curves: bool) -> dict[str, tuple[dict[str, Any] | None, str]]:
    """``meta.json`` (and, when ``curves``, the loss curve drawn from ``loss.csv``) of the items of these rows that have an output image."""
    items = sorted({str(r["item_id"]) for r in rows if r.get("status") in DONE_STATUSES and r.get("item_id")})

    def load(item: str) -> tuple[str, tuple[dict[str, Any] | None, str]]:
        folder = run.item_folder(item)
        if folder is None:
            return item, (None, "")
        meta = _read_json(storage.join(folder, paths.META_FILE))
        return item, (meta, _read_curve(storage.join(folder, paths.LOSS_CSV)) if curves and meta is not None else "")

    return dict(pool.map(load, items))


def build_report(
    run_uri: str,
    dest_uri: str | None = None,
    *,
    workers: int = 8,
    now: datetime | None = None,
    view_rows: int = VIEW_ROWS,
    page_rows: int = PAGE_ROWS,
    max_file_bytes: int = MAX_FILE_BYTES,
    batch_rows: int = BATCH_ROWS,
) -> str:
    """Build ``report.html``, its data scripts and its thumbnails for a stored run; returns the report's address.

    Two passes over the results table, ``batch_rows`` rows at a time: the first
    gathers what the whole run has in common (counts, parameter defaults and
    values, styles), the second writes each row's card and index entry as it
    goes. The page holds the first ``view_rows`` cards and as much of the index
    as fits in a quarter of ``max_file_bytes`` each (the rest of the page, its
    style, script and header, has the other half); the rest is in data scripts beside it
    (``report-files/``: cards ``page_rows`` at a time, index parts), none over
    ``max_file_bytes`` unless one card alone is. Memory is bounded by the batch
    and the run's distinct values, not by its rows: what is kept per item (items
    counted, device seconds, thumbnails present) is in a :class:`_Scratch` on disk.

    Args:
        run_uri: the run folder (``{output_uri}/runs/{run}``) or a file in it.
        dest_uri: where the page, ``report-files/`` and ``thumbs/`` go (default: the run folder itself).
        workers: threads that read items and make thumbnails.
        now: the build time printed on the page.
        view_rows: cards shown at first and added by each "show more".
        page_rows: cards per data script.
        max_file_bytes: the largest page or data script to write.
        batch_rows: results rows (and their items' files) in memory at a time.

    Raises:
        ReviewError: ``run_uri`` is not a run folder.
        StorageError: the page or a script could not be written.
    """
    run = open_run_header(run_uri)
    dest = str(dest_uri).rstrip("/") or str(dest_uri) if dest_uri else run.folder
    decisions = load_decisions(run, workers=workers)
    verdict_of = {item: verdict(ds) for item, ds in decisions.items()}
    with contextlib.closing(_Scratch()) as scratch, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        facts = _RunFacts(verdict_of, scratch)
        for rows in iter_rows(run, batch_rows):
            loaded = _load_items(pool, run, rows, curves=False)
            for row in rows:
                facts.add(row, loaded.get(str(row.get("item_id") or ""), (None, ""))[0] if row.get("status") in DONE_STATUSES else None)
        view = _RunView(run, facts, verdict_of, dest)
        thumbs = _Thumbs(dest, scratch)
        files = _DataFiles(dest)
        quarter = max(1, max_file_bytes // 4)  # the page's share for its cards, and for its part of the index
        # Cards are HTML (escaped) in JSON strings; index entries may hold any cell, so they keep the page's escaping.
        cards = _Pages("cards", files, _data_json, rows=page_rows, max_bytes=max_file_bytes, first_rows=view_rows, first_bytes=quarter)
        index = _Pages("index", files, _script_json, rows=max(1, facts.total), max_bytes=max_file_bytes, first_rows=max(1, facts.total), first_bytes=quarter)
        position = 0
        for rows in iter_rows(run, batch_rows):
            loaded = _load_items(pool, run, rows, curves=True)
            metas = {item: meta for item, (meta, _) in loaded.items() if meta is not None}
            for row, found in zip(rows, pool.map(functools.partial(_thumbs_of, thumbs, run, metas), rows), strict=True):
                item = str(row.get("item_id") or "")
                meta, curve = loaded.get(item, (None, "")) if row.get("status") in DONE_STATUSES else (None, "")
                entry, card = view.row(position, row, meta, curve, found, decisions)
                index.add(position, entry)
                cards.add(position, str(_card_macro()(card)))
                position += 1
        cards.finish()
        index.finish()
        page = _render_page(run, facts, view, cards, index, view_rows=view_rows, now=now or datetime.now(UTC))
    target = storage.join(dest, REPORT_FILE)
    storage.write_bytes(target, page.encode("utf-8"), "text/html; charset=utf-8")
    files.prune()
    return target


def _thumbs_of(thumbs: _Thumbs, run: Run, metas: dict[str, dict[str, Any]], row: dict[str, Any]) -> dict[str, str | None]:
    """The row's thumbnails (content, style, output), made when missing; None where there is no readable image."""
    item = str(row.get("item_id") or "")
    meta = metas.get(item) if row.get("status") in DONE_STATUSES else None
    found: dict[str, str | None] = {"content": None, "style": None, "output": None}
    if meta:
        inputs = meta.get("inputs") or {}
        for role in ("content", "style"):
            info = inputs.get(role) or {}
            found[role] = thumbs.input(info.get("sha256"), info.get("uri"))
        folder = run.item_folder(item)
        image = (meta.get("outputs") or {}).get("image") or paths.image_name()
        if folder and "/" not in image and image not in (".", ".."):
            found["output"] = thumbs.output(item, storage.join(folder, image))
    elif row.get("status") != "invalid":
        for role in ("content", "style"):
            found[role] = thumbs.input(None, row.get(f"{role}_uri"))
    return found


def download_report(run_uri: str, local_dir: str | os.PathLike[str], *, workers: int = 8) -> Path:
    """Copy a stored report, its data scripts and its thumbnails into a local folder; returns the local ``report.html``.

    Files already there (content-addressed names) are not fetched again.
    """
    folder = run_folder(run_uri)
    local = Path(local_dir).expanduser()
    names = []
    for sub in (THUMBS_DIR, DATA_DIR):
        (local / sub).mkdir(parents=True, exist_ok=True)
        names += [(sub, u.rsplit("/", 1)[-1]) for u in storage.list_prefix(storage.join(folder, sub) + "/")]

    def copy(entry: tuple[str, str]) -> None:
        sub, name = entry
        if "/" in name or name.startswith(".") or (local / sub / name).is_file():
            return
        storage.write_bytes(str(local / sub / name), storage.read_bytes(storage.join(folder, sub, name)))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(copy, names))
    target = local / REPORT_FILE
    storage.write_bytes(str(target), storage.read_bytes(storage.join(folder, REPORT_FILE)))
    return target


def _render_page(
    run: Run, facts: _RunFacts, view: _RunView, cards: _Pages, index: _Pages, *, view_rows: int, now: datetime
) -> str:
    """The page (``templates/report.html.j2``): the run's header, the controls, the first cards, the index's first part."""
    summary = run.summary
    counts = facts.counts
    device_s, computed = facts.computed.total(), len(facts.computed)
    per_device_hour = computed / (device_s / 3600) if device_s > 0 else None
    wall_s = finite_number(summary.get("wall_time_s"))
    done_rows = sum(counts.get(s, 0) for s in DONE_STATUSES)
    per_wall_hour = done_rows / (wall_s / 3600) if wall_s else None
    random_note = _weights_note(facts.weights) or (
        "UNTRAINED RANDOM WEIGHTS (random:N) were used in this run: outputs are smoke-test quality." if summary.get("random_weights") else ""
    )
    defaults, varying, builtin = view.defaults, view.varying, _builtin_defaults()
    sorts = [("row", "row"), ("id", "id"), ("status", "status"), ("style", "style"), ("loss", "loss total"),
             ("sd", "style distance"), ("cd", "content distance"), ("dur", "time")]  # fmt: skip
    sorts += [(f"p:{name}", f"parameter {name}") for name in varying]
    shown = len(cards.first)
    data = {
        "run": run.name, "run_uri": run.shown_uri, "format": BULK_FORMAT, "total": facts.total, "step": view_rows,
        "dir": DATA_DIR + "/", "pages": cards.parts, "index": index.parts, "rows": index.first, **view.dictionaries(),
    }  # fmt: skip
    return _template().render(
        csp=_CSP,
        style=Markup(_STYLE),
        script=Markup(_SCRIPT),
        run_name=run.name,
        run_uri=run.shown_uri,
        note=random_note,
        stats={
            "total": facts.total,
            "statuses": [(s, counts.get(s, 0)) for s in STATUSES if counts.get(s) or s in ALWAYS_SHOWN_STATUSES],
            "verdicts": [(v, facts.verdicts.get(v, 0)) for v in VERDICTS],
        },
        facts={
            "device_time": fmt_duration(device_s), "computed": computed,
            "per_device_hour": _rate(per_device_hour), "per_wall_hour": _rate(per_wall_hour) if per_wall_hour else "",
            "wall_time": fmt_duration(wall_s), "devices": facts.devices.most_common(), "weights": facts.weights.most_common(),
            "judges": facts.judges.most_common(),
            "manifest": storage.sanitize_uri(str(summary.get("manifest_uri") or "—")), "run_folder": run.shown_uri,
        },  # fmt: skip
        run_params=[
            {
                "name": name, "value": fmt_param(defaults[name]),
                "changed": name in builtin and _canon(builtin[name]) != _canon(defaults[name]),
                "varies": ", ".join(fmt_param(json.loads(v)) for v in sorted(facts.every[name])[:MAX_FILTER_VALUES]) if name in varying else "",
            }
            for name in sorted(defaults)
        ],  # fmt: skip
        controls={
            "statuses": [(s, counts.get(s, 0)) for s in STATUSES if counts.get(s)],
            "styles": [(uri, label, facts.style_rows.get(uri, 0)) for uri, label in sorted(facts.styles().items(), key=lambda kv: kv[1])],
            "params": [
                (_canon([name, v]), f"{name} = {fmt_param(json.loads(v))} ({facts.every[name][v]})")
                for name in varying for v in sorted(facts.every[name])[:MAX_FILTER_VALUES]
            ],
            "verdicts": VERDICTS,
            "sorts": sorts,
        },
        cards=[Markup(html) for html in cards.first],
        shown=f"{shown} of {facts.total} rows shown",
        more=shown < facts.total,
        data=Markup(_script_json(data)),
        generated=now.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )

def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


# --------------------------------------------------------------------------- template and assets

# The page's style and script are inlined verbatim from static/ (their bytes, leading newline included,
# are what the CSP hashes). The data scripts beside it need 'self' in script-src: on file:// Chromium
# refuses them under a hash-only policy, and its 'self' there matches any file: URL, so 'self' admits
# no more than a page whose every value is escaped could ever ask for.
_STYLE = resources.files(__package__).joinpath("static", "report.css").read_text(encoding="utf-8")
_SCRIPT = resources.files(__package__).joinpath("static", "report.js").read_text(encoding="utf-8")
# Templates whose line breaks (and the indentation after them) are the file's layout only, not the page's.
_COMPACT_TEMPLATES = frozenset({"parts.html.j2"})
_LAYOUT_BREAK = re.compile(r"\n[ \t]*")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


_CSP = (
    "default-src 'none'; img-src 'self' data: blob:; "
    f"style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)} 'self'; "
    "base-uri 'none'; form-action 'none'"
)


class _Loader(jinja2.BaseLoader):
    """The package's templates/; a compact template loses its layout line breaks as it is loaded."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, None, Callable[[], bool]]:
        path = resources.files(__package__).joinpath("templates", template)
        if "/" in template or not path.is_file():
            raise jinja2.TemplateNotFound(template)
        source = path.read_text(encoding="utf-8")
        if template in _COMPACT_TEMPLATES:
            source = _LAYOUT_BREAK.sub("", source)
        return source, None, lambda: True


def _escaped(value: Any) -> Any:
    """Every value the template prints is HTML-escaped (text and attributes alike; None prints nothing).

    Markup (the trusted assets, the SVG curves, the macros' own output) passes as it is.
    """
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=_Loader(), autoescape=True, finalize=_escaped, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _template() -> jinja2.Template:
    return _environment().get_template("report.html.j2")


@functools.cache
def _card_macro() -> Callable[[dict[str, Any]], Markup]:
    """The ``card`` macro of ``templates/parts.html.j2``: one card's HTML (values escaped like the page's)."""
    return _environment().get_template("parts.html.j2").module.card  # type: ignore[attr-defined]
