"""The run's results table: one row per manifest row, written as items finish, and read back.

``{output_uri}/runs/{run}/parts/results-NNNNN.csv`` is written as rows
settle, a chunk's worth of rows per part (a crash leaves the parts written); ``results.csv`` and
``results.parquet`` are written complete at the end. Every write is retried
while storage is unreachable, for up to ``patience_s``; a part that still
cannot be written is skipped (the final tables hold every row).

Reading (:func:`open_run`): a run folder from any storage address, results
from Parquet (else the CSV, its formula guard undone), ``summary.json``, and
where its items live; the report, the review commands and the export work on
old runs too. Writer and reader sit side by side so the guard and its undoing
stay one pair.
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import logging
import math
import pickle
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pandas as pd

from nst_core import storage
from nst_core.errors import NSTError
from nst_run import paths
from nst_run.status import DONE_STATUSES, STATUSES

if TYPE_CHECKING:
    from nst_run.planning import Outcome

BASE_COLUMNS = [
    "id", "row", "status", "error", "item_id", "output_uri", "content_uri", "style_uri",
    "loss_total", "loss_content", "loss_style", "loss_tv", "style_distance", "content_distance",
    "iterations", "duration_s", "device", "weights_id",
]  # fmt: skip

log = logging.getLogger(__name__)

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_QUOTED = re.compile(r"^'[=+\-@\t\r]")  # a cell csv_safe guarded


def run_name(flow_run_name: str | None, now: datetime | None = None) -> str:
    """Unique, sortable run folder name: UTC timestamp plus the flow run's name."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    slug = re.sub(r"[^a-z0-9-]+", "-", (flow_run_name or "local").lower()).strip("-")[:60] or "run"
    return f"{stamp}-{slug}"


def csv_safe(value: Any) -> Any:
    """Neutralise spreadsheet formulas (CSV injection): text cells starting with = + - @ get a leading '."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def frame_of_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The results table of rows (``Outcome.as_row``) in manifest order: the base columns, then the rest sorted."""
    frame = pd.DataFrame(sorted(rows, key=lambda r: r["row"]))
    for column in BASE_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="object")
    extra = sorted(c for c in frame.columns if c not in BASE_COLUMNS)
    return frame[BASE_COLUMNS + extra]


def csv_bytes(frame: pd.DataFrame) -> bytes:
    safe = frame.apply(lambda column: column.map(csv_safe)) if len(frame) else frame
    return safe.to_csv(index=False).encode("utf-8")


# results.parquet is written in row groups of this many rows and read back through a buffer of
# TABLE_READ_BUFFER bytes: a reader going through it in batches (:func:`iter_rows`) then holds one row
# group's pages at a time, not every column of the whole table (pyarrow's defaults: one row group of up
# to a million rows, read whole).
PARQUET_ROW_GROUP_ROWS = 10_000
TABLE_READ_BUFFER = 1 << 16


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    strings = frame.astype({c: "string" for c in frame.columns if frame[c].dtype == object})
    strings.to_parquet(buffer, index=False, row_group_size=PARQUET_ROW_GROUP_ROWS)
    return buffer.getvalue()


TABLE_RESERVE_HEADROOM = 256 * 1024
"""Bytes held from the start for ``summary.json`` and the Parquet file's fixed part (schema, footer)."""
TABLE_RESERVE_PER_CSV_BYTE = 2
"""Bytes held per byte of the rows' CSV: ``results.csv`` and ``results.parquet`` (never larger than the CSV)."""


class LowestRows:
    """The ``n`` outcomes of lowest row number among those added (a bounded heap): the rows a summary or an
    artifact names, kept without keeping every row."""

    def __init__(self, n: int):
        self.n = n
        self._heap: list[tuple[int, int, Outcome]] = []  # (-row, arrival, outcome): the root is the highest row kept
        self._arrival = itertools.count()

    def add(self, outcome: Outcome) -> None:
        entry = (-outcome.row, next(self._arrival), outcome)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, entry)
        elif self._heap and entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def sorted(self) -> list[Outcome]:
        return [outcome for _, _, outcome in sorted(self._heap, key=lambda e: (-e[0], e[1]))]


class ResultsWriter:
    """Accumulates outcomes and stores them under ``{output_uri}/runs/{run}/``.

    On a local file system the writer holds room for the final tables (``paths.TABLE_RESERVE``, a file
    grown as rows come and deleted just before the tables are written): items filling the disk then
    fail their own rows (the disk is full), and the run still ends with its results table.

    Rows are written as they come in parts of ``part_rows`` (``parts/results-NNNNN.csv``), so a run
    that dies part way leaves what it settled; :meth:`finish` writes the whole table. Until then the
    rows wait in a local temporary file, not in memory: a run of 100,000 rows holds its counts, the
    ``keep_rows`` lowest rows and the ``keep_failures`` lowest failed or invalid rows, whatever its length.
    """

    def __init__(self, output_uri: str, run: str, patience_s: float = 300.0, part_rows: int = 64, keep_rows: int = 0, keep_failures: int = 0):
        self.folder = paths.run_folder(output_uri, run)
        self.patience_s = patience_s
        self.part_rows = max(1, part_rows)
        self._found: Counter[str] = Counter()  # rows added, by status
        self._lowest = LowestRows(keep_rows)
        self._lowest_failures = LowestRows(keep_failures)
        self._spool = tempfile.TemporaryFile(prefix="nst-results-")  # pickled batches of rows, read back by finish()
        self._unwritten: list[dict[str, Any]] = []  # rows (Outcome.as_row) of the part being filled
        self._parts = 0
        self._csv_bytes = 0  # of every row so far, as the parts hold them
        self._reserve = paths.run_file(self.folder, paths.TABLE_RESERVE)
        self._hold_room()

    def _write(self, uri: str, data: bytes, content_type: str) -> None:
        storage.retry_transient(lambda: storage.write_bytes(uri, data, content_type), self.patience_s)

    def _hold_room(self) -> None:
        """Grow the reserve to what the tables of the rows so far need; a full disk leaves it as it is."""
        try:
            storage.reserve_space(self._reserve, TABLE_RESERVE_HEADROOM + TABLE_RESERVE_PER_CSV_BYTE * self._csv_bytes)
        except storage.NoSpace as exc:
            log.warning("no room to hold for the results table (%s): it may not fit at the end", exc)

    def add(self, outcomes: list[Outcome]) -> None:
        rows = [o.as_row() for o in outcomes]
        pickle.dump(rows, self._spool, protocol=pickle.HIGHEST_PROTOCOL)
        for outcome in outcomes:
            self._found[outcome.status] += 1
            self._lowest.add(outcome)
            if outcome.status in ("failed", "invalid"):
                self._lowest_failures.add(outcome)
        self._unwritten.extend(rows)
        if len(self._unwritten) >= self.part_rows:
            self._write_part()

    def _write_part(self) -> None:
        if not self._unwritten:
            return
        rows, self._unwritten = self._unwritten, []
        self._parts += 1
        part = paths.results_part(self.folder, self._parts)
        data = csv_bytes(frame_of_rows(rows))
        self._csv_bytes += len(data)
        self._hold_room()
        try:
            self._write(part, data, "text/csv")
        except storage.StorageError as exc:
            if not (exc.transient or isinstance(exc, storage.NoSpace)):
                raise
            log.warning("results part %s not written (%s); the final results.csv will hold its rows", part, exc)

    @property
    def settled(self) -> int:
        """Rows added so far."""
        return sum(self._found.values())

    def counts(self) -> dict[str, int]:
        return {status: self._found.get(status, 0) for status in STATUSES}

    def lowest_rows(self) -> list[Outcome]:
        """The ``keep_rows`` outcomes of lowest row number, in row order."""
        return self._lowest.sorted()

    def lowest_failures(self) -> list[Outcome]:
        """The ``keep_failures`` failed or invalid outcomes of lowest row number, in row order."""
        return self._lowest_failures.sorted()

    def _spooled_rows(self) -> list[dict[str, Any]]:
        self._spool.seek(0)
        rows: list[dict[str, Any]] = []
        while True:
            try:
                rows.extend(pickle.load(self._spool))  # our own file, written by add() in this process
            except EOFError:
                return rows

    def finish(self, summary: dict[str, Any]) -> dict[str, str]:
        """Write ``results.csv``, ``results.parquet`` and ``summary.json`` (in the room held for them).

        Raises:
            NoSpace: the tables did not fit even so; the message says which of the three files were stored.
            StorageError: storage refused a file, or stayed unreachable past ``patience_s``.
        """
        self._write_part()
        frame = frame_of_rows(self._spooled_rows())
        self._spool.close()
        locations = {
            "results_csv": paths.run_file(self.folder, paths.RESULTS_CSV),
            "results_parquet": paths.run_file(self.folder, paths.RESULTS_PARQUET),
            "summary": paths.run_file(self.folder, paths.SUMMARY_FILE),
        }
        contents = {
            "results_csv": (csv_bytes(frame), "text/csv"),
            "results_parquet": (parquet_bytes(frame), "application/octet-stream"),
            "summary": (json.dumps({**summary, **locations}, indent=2).encode(), "application/json"),
        }
        if storage.is_local(self._reserve):
            storage.delete(self._reserve)  # its room is the tables'
        stored: list[str] = []
        for key, (data, content_type) in contents.items():
            try:
                self._write(locations[key], data, content_type)
            except storage.NoSpace as exc:
                kept = f"stored: {', '.join(stored)}" if stored else "none of the tables was stored"
                parts = f"; the rows of {self._parts} chunk(s) are in parts/ where their part was written" if self._parts else ""
                raise storage.NoSpace(exc.uri, f"{exc.reason}; {kept}{parts}") from None
            stored.append(Path(locations[key]).name)
        return locations


# --------------------------------------------------------------------------- reading a run back


class ReviewError(NSTError):
    """A run, item or decision that cannot be used as given (CLI exit code 2)."""


def finite_number(value: Any) -> float | None:
    """A stored value as a finite float, or None (missing, text, NaN, inf): stored metadata is not trusted."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class Run:
    """A stored run read back: where it is, its results rows and summary."""

    folder: str  # {output_uri}/runs/{run}
    name: str
    output_root: str | None  # {output_uri}, when the folder sits in a runs/ folder
    rows: list[dict[str, Any]]  # one per manifest row, from results.parquet (or .csv)
    summary: dict[str, Any] = field(default_factory=dict)

    def item_folder(self, item_id: str) -> str | None:
        if not self.output_root or not paths.ITEM_ID.match(item_id or ""):
            return None
        return paths.item_folder(self.output_root, item_id)

    @property
    def shown_uri(self) -> str:
        """The run's address fit to be written into files (no credentials)."""
        return storage.sanitize_uri(self.folder)

    def done_rows(self) -> list[dict[str, Any]]:
        """Rows whose item has an output image (succeeded or cached)."""
        return [r for r in self.rows if r.get("status") in DONE_STATUSES and r.get("item_id")]


def run_folder(run_uri: str) -> str:
    """Normalise a run address: no trailing slash; a file inside the run folder names the folder."""
    uri = str(run_uri).strip()
    if not uri:
        raise ReviewError("empty run address")
    for name in paths.RUN_FILES:
        if uri.rstrip("/").endswith("/" + name):
            uri = uri.rstrip("/")[: -len(name) - 1]
            break
    stripped = uri.rstrip("/")
    return stripped or uri


def _clean_value(value: Any) -> Any:
    if value is None:
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (AttributeError, ValueError):
            return value
    return value


def _frame_rows(frame: Any, from_csv: bool) -> list[dict[str, Any]]:
    rows = []
    for record in frame.to_dict("records"):
        row = {str(k): _clean_value(v) for k, v in record.items()}
        if from_csv:
            for key, value in row.items():
                if value == "":
                    row[key] = None
                elif isinstance(value, str) and _FORMULA_QUOTED.match(value):
                    row[key] = value[1:]  # undo csv_safe (the CSV-injection guard, above)
            for key in ("loss_total", "loss_content", "loss_style", "loss_tv", "style_distance", "content_distance", "duration_s"):
                if row.get(key) is not None:
                    try:
                        row[key] = float(row[key])
                    except (TypeError, ValueError):
                        row[key] = None
        for key in ("row", "iterations"):
            if row.get(key) is not None:
                try:
                    row[key] = int(float(row[key]))
                except (TypeError, ValueError):
                    pass
        if row.get("id") is not None:
            row["id"] = str(row["id"])
        rows.append(row)
    return rows


def open_run(run_uri: str) -> Run:
    """Read a run folder back (results table and summary). Raises :class:`ReviewError` when it is not one."""
    run = open_run_header(run_uri)
    kind, source = _table_source(run.folder)
    if kind == "parquet":
        run.rows = _frame_rows(pd.read_parquet(source), from_csv=False)
    else:
        run.rows = _frame_rows(pd.read_csv(source, dtype=str, keep_default_na=False), from_csv=True)
    return run


def open_run_header(run_uri: str) -> Run:
    """The run at ``run_uri`` without its rows (``rows`` is empty): folder, name, items' root and summary.

    Raises:
        ReviewError: the folder holds no results table.
    """
    folder = run_folder(run_uri)
    _table_source(folder)  # a folder without a results table is no run
    try:
        stored = json.loads(storage.read_bytes(paths.run_file(folder, paths.SUMMARY_FILE)))
    except (storage.ObjectNotFound, ValueError):
        stored = None
    summary = stored if isinstance(stored, dict) else {}
    root, name = paths.split_run_folder(folder)
    return Run(folder=folder, name=str(summary.get("run") or name), output_root=root, rows=[], summary=summary)


def iter_rows(run: Run, batch_rows: int = 2_000) -> Iterator[list[dict[str, Any]]]:
    """The run's results rows, ``batch_rows`` at a time, in the table's order (manifest row order).

    :func:`open_run` holds every row (fine for review and export); the report of a run of any size
    reads the table in batches instead, so its memory does not grow with the run: Parquet through
    ``pyarrow.parquet.ParquetFile.iter_batches`` over a TABLE_READ_BUFFER stream (a local file is read
    as it goes, a row group's pages at a time; an S3 object is fetched once, compressed), else the CSV
    in chunks, each batch cleaned as ``open_run`` cleans its rows.
    """
    kind, source = _table_source(run.folder)
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(source, buffer_size=TABLE_READ_BUFFER, pre_buffer=False)
        for batch in table.iter_batches(batch_size=batch_rows):
            yield _frame_rows(batch.to_pandas(), from_csv=False)
        return
    with pd.read_csv(source, dtype=str, keep_default_na=False, chunksize=batch_rows) as chunks:
        for chunk in chunks:
            yield _frame_rows(chunk, from_csv=True)


def _table_source(folder: str) -> tuple[str, Path | BinaryIO]:
    """("parquet" or "csv", the table as a local path or bytes in memory); Parquet first."""
    for name, kind in ((paths.RESULTS_PARQUET, "parquet"), (paths.RESULTS_CSV, "csv")):
        uri = paths.run_file(folder, name)
        parsed = storage.parse_uri(uri)
        if parsed.scheme == "file":
            assert parsed.path is not None
            if parsed.path.is_file():
                return kind, parsed.path
            continue
        try:
            return kind, io.BytesIO(storage.read_bytes(uri))
        except storage.ObjectNotFound:
            continue
    raise ReviewError(_not_a_run_message(folder))


def _not_a_run_message(folder: str) -> str:
    shown = storage.sanitize_uri(folder)
    try:
        runs = sorted({u.split("/runs/", 1)[1].split("/", 1)[0] for u in storage.list_prefix(paths.runs_prefix(folder))})
    except (storage.StorageError, ValueError):
        runs = []
    if runs:
        latest = ", ".join(paths.run_folder(shown, r) for r in runs[-3:])
        return f"{shown} is an output folder, not a run; pass one of its runs (latest: {latest})"
    return f"{shown}: not a run folder (no results.parquet or results.csv in it)"
