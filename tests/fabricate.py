"""A finished run fabricated in the stored layout the flow writes, fast, for the report's tests and benchmark.

``runs/{run}/results.parquet`` + ``results.csv`` + ``summary.json`` as
``nst_run.results`` writes them, ``items/{id}/meta.json`` + ``loss.csv`` for
every row with an output, and a tiny output image in one item of every
``image_every`` (the rest get the report's placeholders). No engine runs.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

STYLE_WEIGHTS = (1e5, 3e5, 1e6)


def _png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def fabricate(root: Path, rows: int, *, image_every: int = 10, iterations: int = 100) -> Path:
    """A finished run of ``rows`` rows in the stored layout; returns the run folder.

    Rows: mostly succeeded (loss falling with the row number, so the last succeeded row has the lowest loss),
    one in 50 cached, one in 50 failed, one in 100 invalid; three style weights (a varying parameter).
    """
    import pandas as pd

    from nst_core.params import StyleParams
    from nst_run import paths
    from nst_run.results import BASE_COLUMNS, csv_bytes, parquet_bytes

    out = root / "out"
    inputs = root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    contents, styles = [], []
    for k in range(6):
        data = _png(64, 48, (40 * k, 90, 160))
        (inputs / f"content-{k}.png").write_bytes(data)
        contents.append((str(inputs / f"content-{k}.png"), hashlib.sha256(data).hexdigest()))
    for k in range(4):
        data = _png(48, 48, (200, 50 * k, 60))
        (inputs / f"style-{k}.png").write_bytes(data)
        styles.append((str(inputs / f"style-{k}.png"), hashlib.sha256(data).hexdigest()))
    output_png = _png(64, 64, (120, 120, 30))
    base = StyleParams(weights="random:0").model_dump(mode="json")
    curve = "iteration,total,content,style,tv\n" + "".join(
        f"{i},{1e3 / (i + 1):.8g},{50 / (i + 1):.8g},{900 / (i + 1):.8g},{0.5 / (i + 1):.8g}\n" for i in range(iterations)
    )
    run = "20260101T000000000000Z-fabricated"
    folder = out / "runs" / run
    folder.mkdir(parents=True)
    table = []
    for i in range(rows):
        row = i + 1
        ident = f"img-{row:06d}"
        content, content_sha = contents[i % len(contents)]
        style, style_sha = styles[(i // 7) % len(styles)]
        kind = status_of(i)
        record = {"id": ident, "row": row, "status": kind, "error": None, "item_id": None, "output_uri": None,
                  "content_uri": content, "style_uri": style, "meta_licence": "CC-BY-4.0", "meta_note": f"batch {i // 1000}"}  # fmt: skip
        if kind == "invalid":
            record["error"] = f"row {row}, column style_weight: must be > 0 (got '-3')"
        elif kind == "failed":
            record["error"] = f"content {content}: cannot identify image file"
        else:
            item = item_of(i)
            total = 1000.0 - i * (900.0 / rows)
            weight = STYLE_WEIGHTS[i % len(STYLE_WEIGHTS)]
            losses = {"total": total, "content": total / 20, "style": total * 0.9, "tv": total / 2000}
            quality = {"style_distance": style_distance_of(i), "content_distance": 0.2 + (i % 89) / 100, "judge_weights": "random:1"}
            item_dir = out / "items" / item
            item_dir.mkdir(parents=True)
            image = paths.image_name()
            if i % image_every == 0:
                (item_dir / image).write_bytes(output_png)
            (item_dir / paths.LOSS_CSV).write_text(curve)
            meta = {
                "item_id": item, "engine_version": "fabricated", "created_at": "2026-01-01T00:00:00+00:00",
                "row": {"style_weight": weight} if weight != base["style_weight"] else {},
                "params": {**base, "style_weight": weight},
                "inputs": {"content": {"uri": content, "sha256": content_sha}, "style": {"uri": style, "sha256": style_sha}},
                "weights": {"spec": "random:0", "id": "random:0", "random": True, "note": ""},
                "device": "cpu", "precision": "fp32", "worker": "fabricated:1", "iterations": iterations, "stop_reason": "iterations",
                "wall_time_s": 2.5 + (i % 13) / 10, "final_losses": losses, "quality": quality,
                "outputs": {"image": image, "loss_csv": paths.LOSS_CSV, "loss_png": paths.LOSS_PNG},
            }  # fmt: skip
            (item_dir / paths.META_FILE).write_text(json.dumps(meta))
            record.update({
                "item_id": item, "output_uri": str(item_dir / image), "loss_total": total, "loss_content": losses["content"],
                "loss_style": losses["style"], "loss_tv": losses["tv"], "style_distance": quality["style_distance"],
                "content_distance": quality["content_distance"], "iterations": iterations, "duration_s": meta["wall_time_s"],
                "device": "cpu", "weights_id": "random:0",
            })  # fmt: skip
        table.append(record)
    frame = pd.DataFrame(table)
    for column in BASE_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="object")
    frame = frame[BASE_COLUMNS + sorted(c for c in frame.columns if c not in BASE_COLUMNS)]
    (folder / paths.RESULTS_PARQUET).write_bytes(parquet_bytes(frame))
    (folder / paths.RESULTS_CSV).write_bytes(csv_bytes(frame))
    summary = {"run": run, "manifest_uri": str(root / "manifest.csv"), "random_weights": True, "wall_time_s": rows * 0.5,
               "counts": frame["status"].value_counts().to_dict()}  # fmt: skip
    (folder / paths.SUMMARY_FILE).write_text(json.dumps(summary))
    return folder


def item_of(index: int) -> str:
    """The item id of the ``index``-th row (from 0) of a fabricated run."""
    return hashlib.sha256(f"item {index}".encode()).hexdigest()


def status_of(index: int) -> str:
    """The status of the ``index``-th row (from 0): one in 100 invalid, one in 50 failed, one in 50 cached."""
    return "invalid" if index % 100 == 99 else "failed" if index % 50 == 23 else "cached" if index % 50 == 11 else "succeeded"


def style_distance_of(index: int) -> float:
    """The style distance of the ``index``-th row: a saw-tooth, so its order scatters rows over the whole run."""
    return 0.5 + (index % 97) / 100


def expected(rows: int, shown: int = 48) -> dict[str, str]:
    """The ids the browser checks.

    ``lowest_loss``: the last row with an output (loss falls with the row); ``last``: the last row;
    ``by_sd``: the ``shown``-th row by style distance (ties in row order), the rows before it from pages all over the run.
    """
    done = [i for i in range(rows) if status_of(i) in ("succeeded", "cached")]
    by_sd = sorted(done, key=lambda i: (style_distance_of(i), i))
    return {"lowest_loss": f"img-{done[-1] + 1:06d}", "last": f"img-{rows:06d}", "by_sd": f"img-{by_sd[min(shown, len(by_sd)) - 1] + 1:06d}"}
