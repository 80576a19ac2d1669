"""The run's results table: one row per manifest row, written as items finish.

``{output_uri}/runs/{run}/parts/results-NNNNN.csv`` is written after every
chunk (a crash leaves the finished part); ``results.csv`` and
``results.parquet`` are written complete at the end. Every write is retried
while storage is unreachable, for up to ``patience_s``; a part that still
cannot be written is skipped (the final tables hold every row).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from nst_core import storage
from tasks.stylize import STATUSES, Outcome

BASE_COLUMNS = [
    "id", "row", "status", "error", "item_id", "output_uri", "content_uri", "style_uri",
    "loss_total", "loss_content", "loss_style", "loss_tv", "style_distance", "content_distance",
    "iterations", "duration_s", "device", "weights_id",
]  # fmt: skip

log = logging.getLogger(__name__)

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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


def to_frame(outcomes: list[Outcome]) -> pd.DataFrame:
    rows = [o.as_row() for o in sorted(outcomes, key=lambda o: o.row)]
    frame = pd.DataFrame(rows)
    for column in BASE_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="object")
    extra = sorted(c for c in frame.columns if c not in BASE_COLUMNS)
    return frame[BASE_COLUMNS + extra]


def csv_bytes(frame: pd.DataFrame) -> bytes:
    safe = frame.apply(lambda column: column.map(csv_safe)) if len(frame) else frame
    return safe.to_csv(index=False).encode("utf-8")


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.astype({c: "string" for c in frame.columns if frame[c].dtype == object}).to_parquet(buffer, index=False)
    return buffer.getvalue()


class ResultsWriter:
    """Accumulates outcomes and stores them under ``{output_uri}/runs/{run}/``."""

    def __init__(self, output_uri: str, run: str, patience_s: float = 300.0):
        self.folder = storage.join(output_uri, "runs", run)
        self.outcomes: list[Outcome] = []
        self.patience_s = patience_s
        self._parts = 0

    def _write(self, uri: str, data: bytes, content_type: str) -> None:
        storage.retry_transient(lambda: storage.write_bytes(uri, data, content_type), self.patience_s)

    def add(self, outcomes: list[Outcome]) -> None:
        self.outcomes.extend(outcomes)
        if outcomes:
            self._parts += 1
            part = storage.join(self.folder, "parts", f"results-{self._parts:05d}.csv")
            try:
                self._write(part, csv_bytes(to_frame(outcomes)), "text/csv")
            except storage.StorageError as exc:
                if not exc.transient:
                    raise
                log.warning("results part %s not written (%s); the final results.csv will hold its rows", part, exc)

    def counts(self) -> dict[str, int]:
        found = Counter(o.status for o in self.outcomes)
        return {status: found.get(status, 0) for status in STATUSES}

    def finish(self, summary: dict[str, Any]) -> dict[str, str]:
        frame = to_frame(self.outcomes)
        locations = {
            "results_csv": storage.join(self.folder, "results.csv"),
            "results_parquet": storage.join(self.folder, "results.parquet"),
            "summary": storage.join(self.folder, "summary.json"),
        }
        self._write(locations["results_csv"], csv_bytes(frame), "text/csv")
        self._write(locations["results_parquet"], parquet_bytes(frame), "application/octet-stream")
        self._write(locations["summary"], json.dumps({**summary, **locations}, indent=2).encode(), "application/json")
        return locations
