"""The results table as the report reads it: Parquet in bounded row groups, read back in batches, in order.

A reader going through ``results.parquet`` in batches (``iter_rows``, the report's) holds one row
group's pages at a time; one row group of the whole table (pyarrow's default) made it hold every
column of every row, so the report's memory grew with the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from nst_run import paths
from nst_run.results import PARQUET_ROW_GROUP_ROWS, iter_rows, open_run_header, parquet_bytes

ROWS = 2 * PARQUET_ROW_GROUP_ROWS + 123  # three row groups, the last one short


def table(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"row-{i:06d}" for i in range(rows)],
            "row": range(1, rows + 1),
            "status": ["succeeded" if i % 3 else "failed" for i in range(rows)],
            "loss_total": [1000.0 - i / 10 for i in range(rows)],
        }
    )


def test_results_parquet_is_written_in_row_groups_of_bounded_rows(tmp_path: Path):
    target = tmp_path / "results.parquet"
    target.write_bytes(parquet_bytes(table(ROWS)))
    metadata = pq.ParquetFile(target).metadata
    assert metadata.num_row_groups == 3
    assert max(metadata.row_group(k).num_rows for k in range(metadata.num_row_groups)) == PARQUET_ROW_GROUP_ROWS


def test_batches_across_row_groups_read_every_row_once_in_order(tmp_path: Path):
    folder = tmp_path / "out" / "runs" / "20260101T000000000000Z-table"
    folder.mkdir(parents=True)
    (folder / paths.RESULTS_PARQUET).write_bytes(parquet_bytes(table(ROWS)))
    (folder / paths.SUMMARY_FILE).write_text(json.dumps({"run": folder.name}))
    run = open_run_header(str(folder))
    batches = list(iter_rows(run, batch_rows=3_001))  # not a divisor of the row groups: batches straddle them
    assert [len(b) for b in batches][:-1] == [3_001] * (len(batches) - 1)
    rows = [row for batch in batches for row in batch]
    assert [r["id"] for r in rows] == [f"row-{i:06d}" for i in range(ROWS)]
    assert [r["row"] for r in rows] == list(range(1, ROWS + 1))
    assert rows[-1]["loss_total"] == 1000.0 - (ROWS - 1) / 10


def test_the_writer_keeps_no_row_in_memory_and_the_final_table_holds_every_row(tmp_path: Path):
    """Rows wait in a temporary file until ``finish``: the writer holds its counts, the rows of the part
    being filled, the lowest rows it was asked to keep and the lowest failures, whatever the run's
    length (old code: every Outcome)."""
    import gc
    import random

    from nst_run.planning import Outcome
    from nst_run.results import ResultsWriter

    def live_outcomes() -> int:
        gc.collect()
        return sum(type(o) is Outcome for o in gc.get_objects())

    rows = list(range(1, 501))
    random.Random(0).shuffle(rows)  # rows settle out of manifest order
    writer = ResultsWriter(str(tmp_path / "out"), "run", part_rows=64, keep_rows=3, keep_failures=2)
    before = live_outcomes()
    for start in range(0, len(rows), 25):
        writer.add([
            Outcome(row=r, id=f"r{r}", status="failed" if r % 7 == 0 else "succeeded", error="boom" if r % 7 == 0 else "", meta={"note": "x" * 200})
            for r in rows[start:start + 25]
        ])  # fmt: skip
    assert live_outcomes() - before <= 64 + 3 + 2  # a part's rows not yet written, and the rows asked for (old code: 500)
    assert writer.settled == 500
    assert writer.counts()["failed"] == 500 // 7 and writer.counts()["succeeded"] == 500 - 500 // 7
    assert [o.row for o in writer.lowest_rows()] == [1, 2, 3]
    assert [o.row for o in writer.lowest_failures()] == [7, 14]
    locations = writer.finish({"run": "run"})
    table = pd.read_parquet(locations["results_parquet"])
    assert list(table["row"]) == list(range(1, 501))
    assert list(pd.read_csv(locations["results_csv"])["row"]) == list(range(1, 501))
    assert set(table.loc[table["row"] % 7 == 0, "status"]) == {"failed"} and set(table["note"]) == {"x" * 200}
