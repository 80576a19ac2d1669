"""A run's results table read in bounded batches, for a report of any size.

:func:`nst_run.results.open_run` reads every row into memory (fine for review
and export, whose runs it also resolves targets in); the report reads the
table twice in batches of ``batch_rows`` rows instead, so its memory does not
grow with the run: Parquet through ``pyarrow.parquet.ParquetFile.iter_batches``
(a local file is read as it goes; an S3 object is fetched once, compressed),
else the CSV in chunks, each batch cleaned exactly as ``open_run`` cleans
its rows.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from nst_core import storage
from nst_run import paths
from nst_run.results import ReviewError, Run, _frame_rows, _not_a_run_message, run_folder


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
    return Run(folder, str(summary.get("run") or name), root, [], summary)


def _table_source(folder: str) -> tuple[str, Path | BinaryIO]:
    """("parquet" or "csv", the table as a local path or bytes in memory); Parquet first, as ``open_run``."""
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


def iter_rows(run: Run, batch_rows: int = 2_000) -> Iterator[list[dict[str, Any]]]:
    """The run's results rows, ``batch_rows`` at a time, in the table's order (manifest row order)."""
    kind, source = _table_source(run.folder)
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(source)
        for batch in table.iter_batches(batch_size=batch_rows):
            yield _frame_rows(batch.to_pandas(), from_csv=False)
        return
    import pandas as pd

    with pd.read_csv(source, dtype=str, keep_default_na=False, chunksize=batch_rows) as chunks:
        for chunk in chunks:
            yield _frame_rows(chunk, from_csv=True)
