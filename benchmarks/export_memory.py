"""The parquet export's memory: shards streamed in bounded memory, against one table holding every image.

    .venv/bin/python benchmarks/export_memory.py                                   # 2,000 images of 128 px, 4 MB shards
    .venv/bin/python benchmarks/export_memory.py --items 300 --shard-kb 512 --json /tmp/m.json

A finished run is fabricated (tests/fabricate.py, an output in every item folder), its outputs
replaced by random-noise PNGs (incompressible: ~49 KB at 128 px), then each way of writing the
images into Parquet is measured in a fresh child process, during the writing alone: the peak of
tracemalloc (Python objects: image bytes, the shard being built) plus the peak of pyarrow's memory
pool (Arrow buffers):

* ``streamed``: ``export_dataset(run, dest, form="parquet", max_shard_bytes=...)``, this code;
* ``one_table``: the baseline, every image read into one Arrow table written as one Parquet file
  (what holding every image costs; it proves the measure sees image memory).

This code is measured at ``--items`` and at twice as many: what grows from one to the other is the
metadata held per item (a few KB), not the images.

Then the shards are read back: the largest shard's image bytes (at most the shard size, unless one
image alone is larger) and the row count. Memory figures, not times: the machine's load does not
change them. tests/integration/test_datasets.py runs a small case of this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "export-memory.json"


def noise_png(px: int, seed: int) -> bytes:
    """A ``px`` x ``px`` PNG of random pixels: it does not compress, so its bytes are what memory must hold."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(px, px, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def fabricated_run(root: Path, items: int, px: int) -> tuple[Path, int, int]:
    """(run folder, images, their total bytes): a fabricated run whose every done item has a noise output."""
    from fabricate import fabricate, status_of

    from nst_run import paths

    rows = items
    while sum(status_of(i) in ("succeeded", "cached") for i in range(rows)) < items:
        rows += 1
    run = fabricate(root, rows, image_every=1)
    total = count = 0
    for k, meta in enumerate(sorted((root / "out" / "items").glob(f"*/{paths.META_FILE}"))):
        data = noise_png(px, k)
        (meta.parent / paths.image_name()).write_bytes(data)
        total += len(data)
        count += 1
    return run, count, total


def measure(mode: str, run: str, dest: str, shard_bytes: int) -> dict[str, int]:
    """In this (fresh) process: write the run's images to Parquet one way; the peaks while doing it."""
    import io
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nst_run.export import export_dataset
    from nst_run.results import open_run

    pool = pa.default_memory_pool()
    arrow_before = pool.max_memory()
    tracemalloc.start()
    if mode == "streamed":
        export_dataset([run], dest, form="parquet", max_shard_bytes=shard_bytes)
    else:
        opened = open_run(run)
        rows = [{"image": {"bytes": (Path(opened.item_folder(str(r["item_id"])) or "") / "stylized.png").read_bytes(), "path": str(r["id"])}}
                for r in opened.done_rows()]  # fmt: skip
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        Path(dest).mkdir(parents=True)
        (Path(dest) / "all.parquet").write_bytes(buffer.getvalue())
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrow_peak = pool.max_memory() - arrow_before  # the pool's peak since start; nothing before used it much
    return {"python_peak_bytes": python_peak, "arrow_peak_bytes": arrow_peak, "peak_bytes": python_peak + arrow_peak}


def shard_figures(dest: Path) -> dict[str, int]:
    """Read the shards back: how many, their rows, the largest shard's image bytes."""
    import pyarrow.parquet as pq

    largest = rows = 0
    shards = sorted((dest / "data").glob("*.parquet"))
    for shard in shards:
        images = pq.read_table(shard, columns=["image"]).column("image").to_pylist()
        rows += len(images)
        largest = max(largest, sum(len(i["bytes"]) for i in images))
    return {"shards": len(shards), "rows": rows, "largest_shard_image_bytes": largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--shard-kb", type=int, default=4096)
    parser.add_argument("--json", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--child", choices=("streamed", "one_table"), help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shard_bytes = args.shard_kb * 1024
    if args.child:
        print(json.dumps(measure(args.child, args.run, args.dest, shard_bytes)))
        return

    with tempfile.TemporaryDirectory(prefix="nst-export-memory-") as tmp:
        figures: dict[str, dict[str, int]] = {}
        # (name, items): this code at N and 2N images (what grows with the images), the baseline at N.
        for name, mode, items in (("streamed", "streamed", args.items), ("streamed_2x", "streamed", 2 * args.items), ("one_table", "one_table", args.items)):
            root = Path(tmp) / name
            run, images, total = fabricated_run(root, items, args.px)
            child = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--run", str(run), "--dest", str(root / "dest"), "--shard-kb", str(args.shard_kb)],
                capture_output=True, text=True, check=True, cwd=REPO, timeout=1800,
            )  # fmt: skip
            figures[name] = {"images": images, "image_bytes": total, **json.loads(child.stdout.strip().splitlines()[-1])}
            if mode == "streamed":
                figures[name].update(shard_figures(root / "dest"))
    added = figures["streamed_2x"]["image_bytes"] - figures["streamed"]["image_bytes"]
    summary = {"px": args.px, "shard_bytes": shard_bytes, **figures,
               "growth_per_added_image_byte": (figures["streamed_2x"]["peak_bytes"] - figures["streamed"]["peak_bytes"]) / added}  # fmt: skip
    for name, f in figures.items():
        print(f"{name:>11}: {f['images']:6d} images, {f['image_bytes'] / 2**20:7.1f} MiB; peak {f['peak_bytes'] / 2**20:7.1f} MiB "
              f"= {f['peak_bytes'] / f['image_bytes']:.2f} x the images" + (f"; {f['shards']} shards, largest {f['largest_shard_image_bytes'] / 1024:.0f} KiB of images (limit {args.shard_kb} KiB)" if "shards" in f else ""))  # fmt: skip
    print(f"peak growth from N to 2N images: {summary['growth_per_added_image_byte']:.3f} byte per image byte added (metadata, not images)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
