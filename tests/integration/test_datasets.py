"""Exports load as Hugging Face datasets without thinking (nst_run/export.py, `nst export`).

* ``datasets.load_dataset(DEST)`` reads both forms (image folder, Parquet shards), local and S3
  (copied from the prefix first, as the README says: no s3fs fits our botocore), with decoded
  images of the right sizes and pixels and every metadata column, values as exported;
* every style of a blend (with its weight) and every mask is in the metadata;
* images sit in ``images/<item id[:2]>/``; an export in the earlier flat layout is migrated, never
  duplicated, and files that are not copies of its outputs are left alone;
* shards are named by their bytes, never overwritten, the old ones deleted only when unchanged;
  one folder holds one form;
* the Parquet form streams in bounded memory (benchmarks/export_memory.py, a small case).

One real run (the flow, 32 px, 4 iterations) holds a plain item, a blend of two styles weighted
3:1 and a two-style masked item; the other tests fabricate runs (tests/fabricate.py). HF_* offline
settings come from conftest.py: nothing is downloaded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nst_core.params import StyleParams
from nst_run import review
from nst_run.export import ExportError, export_dataset, md

TINY = StyleParams(size=32, iterations=4, weights="random:0", progress_every=2)
REPO = Path(__file__).resolve().parents[2]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def styled(prefect_server, tmp_path_factory, sample_images) -> dict:
    """A real run: ``plain`` (one style), ``blend`` (two styles, weights 3|1), ``masked`` (two styles, two masks)."""
    from flows.stylize_manifest import stylize_manifest

    root = tmp_path_factory.mktemp("styled-run")
    img = sample_images
    with Image.open(img / "tubingen.jpg") as content:
        width, height = content.size  # a mask is drawn on its content image: the same aspect ratio
    left, right = root / "left.png", root / "right.png"
    half = np.zeros((height, width), dtype=np.uint8)
    half[:, : width // 2] = 255
    Image.fromarray(half).save(left)
    Image.fromarray(255 - half).save(right)
    starry, shipwreck = str(img / "starry_night.jpg"), str(img / "shipwreck.jpg")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "content_uri", "style_uri", "style_blend_weights", "style_masks", "meta_licence"])
    writer.writerows([
        ["plain", str(img / "tubingen.jpg"), starry, "", "", "CC-BY 4.0"],
        ["blend", str(img / "hoovertowernight.jpg"), f"{starry}|{shipwreck}", "3|1", "", "CC0"],
        ["masked", str(img / "tubingen.jpg"), f"{starry}|{shipwreck}", "", f"{left}|{right}", "CC0"],
    ])  # fmt: skip
    (root / "m.csv").write_text(buffer.getvalue(), encoding="utf-8")
    state = stylize_manifest(str(root / "m.csv"), str(root / "out"), defaults=TINY, allow_local_paths=True, retries=0, retry_delay_s=0.1, return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict) and summary["counts"]["succeeded"] == 3, summary
    return {"run": summary["run_folder"], "out": root / "out", "starry": starry, "shipwreck": shipwreck, "masks": [str(left), str(right)]}


def _load(dest: Path, cache: Path):
    import datasets

    return datasets.load_dataset(str(dest), cache_dir=str(cache))["train"]


def _check_loaded(ds, rows: list[dict], out: Path) -> None:
    """``ds`` holds exactly ``rows`` (the export's metadata): every column, its values, each image decoded as stored."""
    assert len(ds) == len(rows) and len(rows) > 0
    assert sorted(ds.column_names) == sorted({"image", *rows[0]} - {"file_name"})
    by_item = {r["item_id"]: r for r in rows}
    for loaded in ds:
        row = by_item.pop(loaded["item_id"])
        image = loaded.pop("image")
        assert isinstance(image, Image.Image)
        with Image.open(out / "items" / row["item_id"] / "stylized.png") as stored:
            assert image.size == stored.size and np.array_equal(np.asarray(image), np.asarray(stored))
        assert loaded == {k: v for k, v in row.items() if k != "file_name"}
    assert not by_item  # each row once


def _check_styles(rows: list[dict], styled: dict) -> None:
    """Every style, its weight and every mask, with each file's sha256."""
    by_id = {r["id"]: r for r in rows}
    starry, shipwreck = styled["starry"], styled["shipwreck"]
    assert by_id["plain"]["style_uris"] == [starry] and by_id["plain"]["style_weights"] == [1.0] and by_id["plain"]["mask_uris"] == []
    blend = by_id["blend"]
    assert blend["style_uris"] == [starry, shipwreck] and blend["style_uri"] == starry
    assert blend["style_weights"] == pytest.approx([0.75, 0.25]) and math.isclose(sum(blend["style_weights"]), 1.0)
    assert blend["style_sha256s"] == [_sha256(Path(starry)), _sha256(Path(shipwreck))] and blend["style_sha256"] == _sha256(Path(starry))
    masked = by_id["masked"]
    assert masked["style_uris"] == [starry, shipwreck] and masked["style_weights"] == pytest.approx([0.5, 0.5])
    assert masked["mask_uris"] == styled["masks"] and masked["mask_sha256s"] == [_sha256(Path(m)) for m in styled["masks"]]
    assert by_id["blend"]["mask_uris"] == [] and by_id["blend"]["mask_sha256s"] == []
    assert not {"style_blend_weights", "style_masks"} & set(blend)  # listed once, as the columns above


def _jsonl(dest: Path) -> list[dict]:
    return [json.loads(line) for line in (dest / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def test_image_folder_loads_with_every_style_mask_and_column(styled, tmp_path):
    dest = tmp_path / "dataset"
    result = export_dataset([styled["run"]], str(dest))
    assert (result.images, result.written, result.form) == (3, 3, "imagefolder")
    rows = _jsonl(dest)
    for r in rows:
        assert r["file_name"] == f"images/{r['item_id'][:2]}/{r['id']}-{r['item_id'][:12]}.png" and (dest / r["file_name"]).is_file()
    _check_styles(rows, styled)
    assert [r["id"] for r in pq.read_table(dest / "metadata.parquet").to_pylist()] == [r["id"] for r in rows]
    card = (dest / "README.md").read_text(encoding="utf-8")
    assert "    - metadata.parquet\n    - images/*/*\n---" in card and "aws s3 sync" in card
    assert md(f"{styled['starry']} + {styled['shipwreck']}") in card  # the blend, not only its first style
    _check_loaded(_load(dest, tmp_path / "cache"), rows, styled["out"])


def test_parquet_form_loads_the_same_dataset_from_shards(styled, tmp_path, capsys):
    from datasets import Image as ImageFeature

    from nst_cli.main import main

    dest = tmp_path / "shards"
    # 10 bytes a shard: every image is larger, so each gets a shard of its own.
    assert main(["export", styled["run"], str(dest), "--format", "parquet", "--max-shard-mb", "0.00001"]) == 0
    out = capsys.readouterr().out
    assert "exported 3 image(s)" in out and "(parquet)" in out and "shards: 3 file(s)" in out
    shards = sorted(p.relative_to(dest).as_posix() for p in (dest / "data").iterdir())
    assert len(shards) == 3 and not (dest / "images").exists() and not (dest / "metadata.jsonl").exists()
    card = (dest / "README.md").read_text(encoding="utf-8")
    assert "".join(f"    - {s}\n" for s in shards) + "---" in card
    record = json.loads((dest / ".nst-export.json").read_text())
    assert record["form"] == "parquet" and sorted(record["shards"]) == shards
    assert all(_sha256(dest / s) == d and d.startswith(s[-24:-8]) for s, d in record["shards"].items())

    rows = pq.read_table(dest / "metadata.parquet").to_pylist()
    _check_styles(rows, styled)
    ds = _load(dest, tmp_path / "cache")
    _check_loaded(ds, rows, styled["out"])
    # The shards hold the stored bytes themselves, named as in the image folder form.
    for raw, row in zip(ds.cast_column("image", ImageFeature(decode=False))["image"], ds, strict=True):
        assert raw["bytes"] == (styled["out"] / "items" / row["item_id"] / "stylized.png").read_bytes()
        assert raw["path"].startswith(f"images/{row['item_id'][:2]}/")

    # Both forms load to the same table.
    folder = tmp_path / "folder"
    export_dataset([styled["run"]], str(folder))
    as_folder = _load(folder, tmp_path / "cache-folder")
    assert as_folder.features == ds.features
    assert sorted(as_folder.remove_columns("image").to_list(), key=str) == sorted(ds.remove_columns("image").to_list(), key=str)


def test_s3_exports_load_after_copying_the_prefix(styled, s3_bucket, s3_env, tmp_path):
    """The README's route: export to s3://, copy the prefix (``aws s3 sync``; here boto3), load the copy."""
    client = s3_env.client()
    for form in ("imagefolder", "parquet"):
        prefix = f"datasets/{form}"
        result = export_dataset([styled["run"]], f"s3://{s3_bucket}/{prefix}", form=form, max_shard_bytes=4096)
        assert result.images == 3 and result.written == 3
        local = tmp_path / form
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix=prefix + "/") for o in page.get("Contents", [])]
        for key in keys:
            target = local / key.removeprefix(prefix + "/")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(s3_bucket, key, str(target))
        if form == "imagefolder":
            assert sum(k.startswith(f"{prefix}/images/") for k in keys) == 3
            assert all(k.count("/") == 4 for k in keys if k.startswith(f"{prefix}/images/"))  # datasets/imagefolder/images/ab/x.png
            rows = _jsonl(local)
        else:
            rows = pq.read_table(local / "metadata.parquet").to_pylist()
        _check_styles(rows, styled)
        _check_loaded(_load(local, tmp_path / f"cache-{form}"), rows, styled["out"])


# --------------------------------------------------------------------------- fabricated runs: layout, shards, memory


def _fabricated(tmp_path: Path, rows: int) -> tuple[str, Path]:
    """(run folder, output folder) of a fabricated run with an output image in every item."""
    from fabricate import fabricate

    run = fabricate(tmp_path / "fab", rows, image_every=1)
    out = tmp_path / "fab" / "out"
    for k, folder in enumerate(sorted((out / "items").iterdir())):  # distinct outputs, so a mix-up shows
        Image.new("RGB", (16 + k % 7, 12), (k * 5 % 256, 40, 90)).save(folder / "stylized.png")
    return str(run), out


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_an_export_in_the_flat_layout_is_migrated_never_duplicated(tmp_path):
    run, out = _fabricated(tmp_path, 24)
    dest = tmp_path / "dataset"
    # An export as the earlier version wrote it: images/<id>-<item id[:12]>.png, a record without a form.
    export_dataset([run], str(dest))
    rows = _jsonl(dest)
    for r in rows:
        flat = "images/" + r["file_name"].rsplit("/", 1)[-1]
        (dest / r["file_name"]).rename(dest / flat)
        r["file_name"] = flat
    for folder in (dest / "images").iterdir():
        if folder.is_dir():
            folder.rmdir()
    (dest / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    card = (dest / "README.md").read_text(encoding="utf-8").replace("images/*/*", "images/*")
    (dest / "README.md").write_text(card, encoding="utf-8")
    (dest / ".nst-export.json").write_text(json.dumps({"files": {n: [_sha256(dest / n)] for n in ("metadata.jsonl", "metadata.parquet", "README.md")}}))
    # Someone's file, and a flat image edited since: neither is a copy of an output, so neither may go.
    (dest / "images" / "someone-else.png").write_bytes(b"not ours")
    edited = rows[0]["file_name"]
    Image.new("RGB", (5, 5), (1, 2, 3)).save(dest / edited)

    result = export_dataset([run], str(dest))
    assert (result.images, result.migrated, result.written) == (len(rows), len(rows) - 1, len(rows))
    assert result.stale == sorted([edited, "images/someone-else.png"])
    new_rows = _jsonl(dest)
    assert [r["file_name"] for r in new_rows] == [f"images/{r['item_id'][:2]}/{r['file_name'].rsplit('/', 1)[-1]}" for r in rows]
    assert _files(dest / "images") == sorted([r["file_name"].removeprefix("images/") for r in new_rows] + [edited.removeprefix("images/"), "someone-else.png"])
    for r in new_rows:
        assert (dest / r["file_name"]).read_bytes() == (out / "items" / r["item_id"] / "stylized.png").read_bytes()
    ds = _load(dest, tmp_path / "cache")  # the flat leftovers are not loaded: the card names images/*/*
    assert len(ds) == len(rows) and sorted(ds["item_id"]) == sorted(r["item_id"] for r in rows)

    again = export_dataset([run], str(dest))
    assert (again.migrated, again.written, again.already_there) == (0, 0, len(rows))


def test_parquet_shards_are_named_by_their_bytes_and_replaced_only_when_ours(tmp_path):
    run, out = _fabricated(tmp_path, 40)
    dest = tmp_path / "shards"
    limit = sum(p.stat().st_size for p in (out / "items").glob("*/stylized.png")) // 4
    first = export_dataset([run], str(dest), form="parquet", max_shard_bytes=limit)
    assert len(first.shards) >= 4 and first.written == first.images
    assert _files(dest / "data") == sorted(s.removeprefix("data/") for s in first.shards)
    for shard in first.shards:
        images = pq.read_table(dest / shard, columns=["image"]).column("image").to_pylist()
        assert sum(len(i["bytes"]) for i in images) <= limit

    # The same export again: the same shards, nothing written.
    same = export_dataset([run], str(dest), form="parquet", max_shard_bytes=limit)
    assert (same.shards, same.written, same.already_there, same.stale) == (first.shards, 0, first.images, [])

    # A decision changes the shards (their reviews column, at least the one holding its row): new names, the old deleted...
    review.record_decision(run, "img-000040", "keep", "ann")
    (dest / "data" / "mine.parquet").write_bytes(b"someone's file")
    second = export_dataset([run], str(dest), form="parquet", max_shard_bytes=limit)
    assert second.shards != first.shards and second.written > 0
    assert _files(dest / "data") == sorted([s.removeprefix("data/") for s in second.shards] + ["mine.parquet"])
    assert second.stale == ["data/mine.parquet"]
    # ...but never one whose bytes changed since: someone's edit is kept and reported.
    changed = next(s for s in second.shards if "img-000040" in pq.read_table(dest / s, columns=["id"]).column("id").to_pylist())
    (dest / changed).write_bytes(b"edited by hand")
    review.record_decision(run, "img-000040", "reject", "ann")
    third = export_dataset([run], str(dest), form="parquet", max_shard_bytes=limit)
    assert changed not in third.shards and (dest / changed).read_bytes() == b"edited by hand"
    assert sorted(third.stale) == sorted([changed, "data/mine.parquet"])
    ds = _load(dest, tmp_path / "cache")
    assert len(ds) == third.images and dict(zip(ds["id"], ds["decision"], strict=True))["img-000040"] == "rejected"

    # One folder, one form: either way round it is refused before anything is written.
    before = _files(dest)
    with pytest.raises(ExportError, match="parquet form"):
        export_dataset([run], str(dest))
    assert _files(dest) == before
    folder = tmp_path / "folder"
    export_dataset([run], str(folder))
    before = _files(folder)
    with pytest.raises(ExportError, match="imagefolder form"):
        export_dataset([run], str(folder), form="parquet")
    assert _files(folder) == before


@pytest.mark.slow
def test_parquet_export_memory_is_bounded_by_the_shard_not_the_images(tmp_path):
    """benchmarks/export_memory.py, small: the peak grows with metadata, not images; shards keep their size."""
    figures_file = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "export_memory.py"), "--items", "80", "--px", "192", "--shard-kb", "512",
                    "--json", str(figures_file)], check=True, cwd=REPO, timeout=600, capture_output=True)  # fmt: skip
    f = json.loads(figures_file.read_text())
    # The measure sees image memory: holding every image costs more than the images.
    assert f["one_table"]["peak_bytes"] > f["one_table"]["image_bytes"]
    for case in ("streamed", "streamed_2x"):
        assert f[case]["rows"] == f[case]["images"] and f[case]["largest_shard_image_bytes"] <= f["shard_bytes"]
        assert f[case]["shards"] >= f[case]["image_bytes"] / f["shard_bytes"]
    # Twice the images: the peak grows by the metadata of the items added (a few KB each), not by their images.
    assert f["growth_per_added_image_byte"] < 0.25
    assert f["streamed_2x"]["peak_bytes"] < f["streamed_2x"]["image_bytes"] / 2


def test_the_shard_folder_is_the_item_ids_first_two_hex_digits():
    from nst_run.export import image_file_name

    item = "3f" + "0" * 62
    assert image_file_name("x", item, "png") == f"images/3f/x-{item[:12]}.png"
    assert image_file_name("other id", item, "png").startswith("images/3f/")  # the id names the file, never the folder
    with pytest.raises(ExportError):
        image_file_name("x", "../" + item, "png")
