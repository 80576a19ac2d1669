"""Export stored runs as a Hugging Face dataset: an image folder, or Parquet shards with the images in them.

``export_dataset([run, ...], dest)`` writes, to a local folder or an
``s3://`` prefix, the image-folder form (the default)::

    {dest}/images/{item id[:2]}/{safe id}-{item id[:12]}.{png|jpg|webp}
    {dest}/metadata.jsonl      one line per image: file_name + every metadata field
    {dest}/metadata.parquet    the same table, one row per image
    {dest}/README.md           dataset card (YAML header + what, with what, parameters, weights, sources, licences)
    {dest}/.nst-export.json    the sha256 of the files above as this module last wrote them (and the form)

or, with ``form="parquet"`` (``nst export --format parquet``), for large exports::

    {dest}/data/train-{k:05d}-{sha256[:16]}.parquet   the images' bytes (column ``image``) + every metadata field
    {dest}/metadata.parquet, README.md, .nst-export.json   as above (no metadata.jsonl, no images/)

Images are sharded into 256 folders by the first two hex digits of their
``item_id`` (Hugging Face advises fewer than 10,000 files per folder: this
holds up to ~2.5 million images). The folder is a function of the item's
content address alone, so an image keeps its path across re-exports. Parquet
shards hold at most ``max_shard_bytes`` of image bytes each (500 MB by default,
what ``datasets`` itself writes) and are written one at a time, in row groups
of at most 100 images: memory holds one shard and a few images, never the
export. A shard is named by its content, so exporting the same thing again
writes nothing, and a shard is never overwritten.

An export never overwrites or deletes a file it did not write: a ``README.md``
or metadata file whose bytes differ from what ``.nst-export.json`` records (a
card someone wrote or edited, another tool's metadata) stops the export before
anything is written (:class:`ExportError`, CLI exit 2), as does a folder that
holds an export of the other form. Shards of an earlier export that the new
card no longer lists are deleted only when their bytes are the ones recorded.
An image folder written by an earlier version (every image directly in
``images/``) is migrated: each image is copied to its shard folder, the new
metadata written, and only then the flat copy deleted, and only when its bytes
are those of the item's output (so nothing is lost); other files are reported
as stale, never deleted.

Images are named by the manifest ``id`` (made safe for any file system: no
``/``, no ``..``, no leading dot, no control characters; at most 80
characters) followed by the first 12 hex digits of the ``item_id``, the
content address of the image. One item is one image however many rows or
runs produced it: rows that share it are listed in its ``sources`` field, and
an image already in ``dest`` is not written again, so exporting several runs
(or exporting again) never duplicates an image.

Every style of a blend and every style mask is recorded: ``style_uris``,
``style_sha256s`` and ``style_weights`` (the blend weights normalised to sum
1, as the engine used them), ``mask_uris`` and ``mask_sha256s`` (empty
without masks); ``style_uri`` and ``style_sha256`` name the first style.

The card's YAML ``configs`` names the data files: ``metadata.parquet`` and
``images/*/*``, or the shards. ``datasets.load_dataset(dest)`` reads either
form (as does the Hub) to the same columns and types, those of one Arrow
schema inferred from every row: the image-folder loader refuses two metadata
formats at once, and from ``metadata.jsonl`` it would infer the types from its
first 10 MB alone and read ISO times as naive timestamps. ``metadata.jsonl``
is for people and other tools; ``pandas.read_parquet(dest +
"/metadata.parquet")`` gives the table. The shards' Arrow schema carries the
``datasets`` feature ``Image`` for the ``image`` column, so it loads decoded.

With ``only="kept"`` only items whose verdict is ``kept`` (every reviewer's
latest decision is keep; see :mod:`nst_run.review`) are exported. No Prefect
here; every URI written is passed through :func:`nst_core.storage.sanitize_uri`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nst_core import storage
from nst_core.params import EXECUTION_FIELDS, input_role, normalised_blend_weights
from nst_run import paths
from nst_run.results import ReviewError, Run, finite_number, open_run
from nst_run.review import Decision, latest_per_reviewer, load_decisions, verdict

if TYPE_CHECKING:
    import pyarrow as pa

IMAGES_DIR = "images"
DATA_DIR = "data"
EXPORT_RECORD = ".nst-export.json"
METADATA_JSONL = "metadata.jsonl"
METADATA_PARQUET = "metadata.parquet"
CARD = "README.md"
_EXPORT_FILES = (METADATA_JSONL, METADATA_PARQUET, CARD)
FORMATS = ("imagefolder", "parquet")
ONLY_CHOICES = ("kept",)
MAX_STEM = 80
SHARD_DIGITS = 2  # images/{item_id[:2]}/: 256 folders, each under 10,000 files up to ~2.5 million images
MIB = 1 << 20
DEFAULT_SHARD_BYTES = 500 * MIB  # what datasets writes (its MAX_SHARD_SIZE, "500MB")
ROW_GROUP_ROWS = 100  # a row group is what a reader (the Hub's viewer) holds at once: ~100 images
ROW_GROUP_BYTES = 100 * MIB  # datasets' MAX_ROW_GROUP_SIZE
META_BATCH_ROWS = 1_000  # rows whose meta.json are read (in parallel) and held at once
IMAGE_COLUMN = "image"
# The datasets feature of the image column, in the Arrow schema's "huggingface" metadata (as datasets writes it).
_HF_FEATURES = {"info": {"features": {IMAGE_COLUMN: {"_type": "Image"}}}}
_IGNORED_PARAMS = EXECUTION_FIELDS  # how an item ran, not what it made: not exported as parameters
_LISTED_PARAMS = frozenset({"style_blend_weights", "style_masks"})  # exported as style_weights and mask_uris
_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
_LICENCE_WORDS = re.compile(r"licen[cs]e|rights|copyright|attribution|credit|author|source", re.IGNORECASE)
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


class ExportError(ReviewError):
    """An export that cannot be done as asked (CLI exit code 2)."""


def safe_stem(manifest_id: str) -> str:
    """A manifest id as a safe file-name stem: ``[A-Za-z0-9._-]``, no leading dot, at most 80 characters.

    Never empty and never a path: ``../x/<y>`` becomes ``x_y_`` style names; the
    caller appends the item id, so two ids that clean up alike still differ.
    """
    text = unicodedata.normalize("NFKD", str(manifest_id)).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    text = re.sub(r"\.{2,}", ".", text).strip("._-")[:MAX_STEM].strip("._-")
    if not text or text.lower().split(".", 1)[0] in _WINDOWS_RESERVED:
        text = f"item_{text}" if text else "item"
    return text


def image_file_name(manifest_id: str, item_id: str, ext: str) -> str:
    """``images/{item_id[:2]}/{safe id}-{item_id[:12]}.{ext}``: the shard folder depends on the content address alone.

    Raises:
        ExportError: ``item_id`` is not hex, or ``ext`` is not an image extension.
    """
    if not re.fullmatch(r"[0-9a-f]{12,64}", item_id):
        raise ExportError(f"not an item id: {item_id!r}")
    if ext not in _CONTENT_TYPES:
        raise ExportError(f"unexpected image extension {ext!r}")
    return f"{IMAGES_DIR}/{item_id[:SHARD_DIGITS]}/{safe_stem(manifest_id)}-{item_id[:12]}.{ext}"


def _param_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ExportResult:
    dest: str
    form: str = "imagefolder"
    images: int = 0
    written: int = 0
    already_there: int = 0
    migrated: int = 0  # flat images/ files of an earlier layout moved into their shard folders
    runs: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows
    stale: list[str] = field(default_factory=list)  # files in images/ or data/ that this export does not list
    shards: list[str] = field(default_factory=list)  # the parquet form's shards, relative to dest
    files: dict[str, str] = field(default_factory=dict)


def _inputs_of(inputs: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The recorded inputs of one kind in order: ``style``, ``style_1``, ... (or ``style_mask``, ``style_mask_1``, ...)."""
    found: list[dict[str, Any]] = []
    while isinstance(entry := inputs.get(input_role(kind, len(found))), dict):
        found.append(entry)
    return found


def _record(run: Run, row: dict[str, Any], meta: dict[str, Any], file_name: str, decisions: list[Decision]) -> dict[str, Any]:
    inputs = meta.get("inputs") or {}
    params = meta.get("params") or {}
    weights = meta.get("weights") or {}
    quality = meta.get("quality") or {}
    # meta.json's inputs hold every style and mask by role; a run without them has the results table's "a|b".
    styles = _inputs_of(inputs, "style") or [{"uri": u} for u in str(row.get("style_uri") or "").split("|") if u]
    masks = _inputs_of(inputs, "style_mask")
    record: dict[str, Any] = {
        "file_name": file_name,
        "id": str(row.get("id")),
        "row": row.get("row"),
        "run": run.name,
        "item_id": str(meta.get("item_id") or row.get("item_id")),
        "decision": verdict(decisions),
        "content_uri": storage.sanitize_uri((inputs.get("content") or {}).get("uri") or row.get("content_uri") or ""),
        "style_uri": storage.sanitize_uri(styles[0]["uri"]) if styles else "",
        "style_uris": [storage.sanitize_uri(str(s.get("uri") or "")) for s in styles],
        "style_weights": list(normalised_blend_weights(params.get("style_blend_weights"), len(styles))) if styles else [],
        "mask_uris": [storage.sanitize_uri(str(m.get("uri") or "")) for m in masks],
        "init_uri": storage.sanitize_uri((inputs.get("init") or {}).get("uri")) if inputs.get("init") else None,  # type: ignore[arg-type]
        "content_sha256": (inputs.get("content") or {}).get("sha256"),
        "style_sha256": styles[0].get("sha256") if styles else None,
        "style_sha256s": [s.get("sha256") for s in styles],
        "mask_sha256s": [m.get("sha256") for m in masks],
        "weights_id": weights.get("id") or row.get("weights_id"),
        "weights_random": bool(weights.get("random", str(weights.get("id", "")).startswith("random:"))),
    }
    for name, value in params.items():
        if name in _IGNORED_PARAMS or name in _LISTED_PARAMS or name in record:
            continue
        record[name] = storage.sanitize_uri(value) if name in ("weights", "init") and isinstance(value, str) else _param_value(value)
    record.update({
        "compute_device": meta.get("device"),
        "iterations_run": meta.get("iterations"),
        "stop_reason": meta.get("stop_reason"),
        "wall_time_s": finite_number(meta.get("wall_time_s")),
    })  # fmt: skip
    for name, value in (meta.get("final_losses") or {}).items():
        record["loss_" + re.sub(r"[^A-Za-z0-9_]+", "_", name)] = finite_number(value)
    record.update({
        "style_distance": finite_number(quality.get("style_distance")),
        "content_distance": finite_number(quality.get("content_distance")),
        "judge_weights": quality.get("judge_weights"),
        "engine_version": meta.get("engine_version"),
        "created_at": meta.get("created_at"),
        "reviews": [{"reviewer": d.reviewer, "decision": d.decision, "note": d.note, "decided_at": d.decided_at} for d in latest_per_reviewer(decisions)],
        "sources": [{"run": run.name, "row": row.get("row"), "id": str(row.get("id"))}],
    })  # fmt: skip
    for name in sorted(k for k in row if k.startswith("meta_")):
        record[name] = None if row[name] is None else str(row[name])
    return record


def export_dataset(
    run_uris: list[str],
    dest_uri: str,
    *,
    only: str | None = None,
    form: str = "imagefolder",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    workers: int = 8,
) -> ExportResult:
    """Write the done items of one or more runs as a dataset at ``dest_uri``.

    Args:
        run_uris: run folders (``{output}/runs/{run}``), paths or ``s3://`` URIs.
        dest_uri: the destination folder or ``s3://`` prefix.
        only: ``"kept"``: only items every reviewer kept.
        form: ``"imagefolder"`` (``images/<item id[:2]>/`` + metadata files) or ``"parquet"`` (shards with the images in them).
        max_shard_bytes: the parquet form's image bytes per shard (a larger image gets a shard of its own).
        workers: threads reading and writing storage.

    Raises:
        ExportError: bad arguments, a run listed twice, ``dest`` holding files no export wrote or an
            export of the other form (before anything is written).
    """
    if not run_uris:
        raise ExportError("export needs at least one run")
    if only is not None and only not in ONLY_CHOICES:
        raise ExportError(f"--only: {only!r} is not one of {', '.join(ONLY_CHOICES)}")
    if form not in FORMATS:
        raise ExportError(f"--format: {form!r} is not one of {', '.join(FORMATS)}")
    if max_shard_bytes < 1:
        raise ExportError(f"the shard size must be at least 1 byte (got {max_shard_bytes})")
    dest = str(dest_uri).rstrip("/") or str(dest_uri)
    storage.parse_uri(dest)  # refuses unsupported schemes before any work
    # Oldest run first (run folders are named by their UTC start time), whatever the order given:
    # the earliest id of an item names its image, so exporting again never renames it.
    runs = sorted((open_run(uri) for uri in run_uris), key=lambda r: r.name)
    if len({r.folder for r in runs}) != len(runs):
        raise ExportError("a run is listed twice")
    result = ExportResult(dest=storage.sanitize_uri(dest), form=form, runs=[r.shown_uri for r in runs])
    previous = _check_ours(dest, form)
    records, sources = _collect(runs, only, workers, result)
    columns = _columns(list(records.values()))
    rows = [_in_columns(records.pop(item), columns) for item in list(records)]  # one copy of the metadata at a time
    table = _metadata_table(rows)
    record = _Record(dest, form, previous)

    flat_copies: list[str] = []
    if form == "imagefolder":
        flat_copies = _write_images(dest, rows, sources, workers, result)
    else:
        _write_shards(dest, rows, sources, _shard_schema(table.schema), max_shard_bytes, workers, result, record)
    result.images = len(rows)

    contents = {METADATA_PARQUET: (_parquet_bytes(table), "application/vnd.apache.parquet"),
                CARD: (dataset_card(rows, runs, only, form, result.shards).encode("utf-8"), "text/markdown; charset=utf-8")}  # fmt: skip
    if form == "imagefolder":
        jsonl = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode("utf-8")
        contents = {METADATA_JSONL: (jsonl, "application/jsonl"), **contents}
    # Old and new bytes both vouched for while the files are replaced, so a crash between the writes
    # leaves nothing the next export would take for someone else's file.
    record.files = {name: sorted({storage.sha256_bytes(data), *previous.digests.get(name, [])}) for name, (data, _) in contents.items()}
    record.write()
    for name, (data, content_type) in contents.items():
        storage.write_bytes(storage.join(dest, name), data, content_type)
    record.files = {name: [storage.sha256_bytes(data)] for name, (data, _) in contents.items()}
    # The new metadata is in place: the flat copies of migrated images and the shards it no longer lists can go.
    for name in flat_copies:
        storage.delete(storage.join(dest, IMAGES_DIR, name))
    result.migrated = len(flat_copies)
    deleted = _delete_unlisted_shards(dest, previous, set(result.shards), record)
    result.stale = sorted(set(result.stale) - deleted)
    record.write()
    result.files = {key: storage.sanitize_uri(storage.join(dest, name)) for key, name in
                    (("metadata_jsonl", METADATA_JSONL), ("metadata_parquet", METADATA_PARQUET), ("card", CARD)) if name in contents}  # fmt: skip
    return result


def _collect(runs: list[Run], only: str | None, workers: int, result: ExportResult) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(item id -> record, item id -> image URI to copy from), items in first-seen order; skips counted in ``result``."""
    # Every decision about an item, from every run given, decides its verdict.
    all_decisions: dict[str, list[Decision]] = {}
    for run in runs:
        for item, found in load_decisions(run, workers=workers).items():
            all_decisions.setdefault(item, []).extend(found)

    records: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for run in runs:
        done = run.done_rows()
        done_rows = {id(r) for r in done}
        result.skipped.update(f"status {r.get('status')}" for r in run.rows if id(r) not in done_rows)

        def read_meta(item: str, run: Run = run) -> tuple[str, dict[str, Any] | None]:
            folder = run.item_folder(item)
            if folder is None:
                return item, None
            try:
                meta = json.loads(storage.read_bytes(storage.join(folder, paths.META_FILE)))
            except storage.ObjectNotFound:
                return item, None
            return item, meta if isinstance(meta, dict) else None

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # meta.json read a batch of rows at a time: only the records (a few KB an item) stay for the whole export.
            for start in range(0, len(done), META_BATCH_ROWS):
                batch = done[start : start + META_BATCH_ROWS]
                metas = dict(pool.map(read_meta, sorted({i for r in batch if (i := str(r["item_id"])) not in records})))
                for row in batch:
                    _add_row(run, row, metas, records, sources, all_decisions, only, result)
    return records, sources


def _add_row(
    run: Run, row: dict[str, Any], metas: dict[str, dict[str, Any] | None], records: dict[str, dict[str, Any]], sources: dict[str, str],
    all_decisions: dict[str, list[Decision]], only: str | None, result: ExportResult,
) -> None:  # fmt: skip
    """Add a done row: a new record for its item, or a source of the item's record; a skip counted in ``result``."""
    item = str(row["item_id"])
    if item in records:
        source = {"run": run.name, "row": row.get("row"), "id": str(row.get("id"))}
        if source not in records[item]["sources"]:
            records[item]["sources"].append(source)
        return
    meta = metas.get(item)
    if meta is None:
        result.skipped["item files missing"] += 1
        return
    decisions = all_decisions.get(item, [])
    if only == "kept" and verdict(decisions) != "kept":
        result.skipped[f"not kept ({verdict(decisions)})"] += 1
        return
    image = str((meta.get("outputs") or {}).get("image") or paths.image_name())
    ext = image.rsplit(".", 1)[-1].lower()
    if "/" in image or ext not in _CONTENT_TYPES:
        result.skipped["unexpected output file name"] += 1
        return
    folder = run.item_folder(item)
    assert folder is not None
    records[item] = _record(run, row, meta, image_file_name(str(row.get("id")), item, ext), decisions)
    sources[item] = storage.join(folder, image)


def _listed(prefix: str) -> set[str]:
    """Names under ``prefix`` (a folder URI ending in ``/``), relative to it; nothing when it cannot be listed."""
    try:
        return {u.removeprefix(prefix) for u in storage.list_prefix(prefix)}
    except storage.StorageError:
        return set()


def _write_images(dest: str, rows: list[dict[str, Any]], sources: dict[str, str], workers: int, result: ExportResult) -> list[str]:
    """Copy each image absent from ``dest/images/``; returns the flat copies (earlier layout) to delete once the metadata is written."""
    prefix = storage.join(dest, IMAGES_DIR) + "/"
    present = _listed(prefix)
    # An earlier version wrote images/{safe id}-{item id[:12]}.{ext}: found by the part a re-export cannot change.
    flat_by_item: dict[str, list[str]] = {}
    for name in present:
        if "/" not in name:
            flat_by_item.setdefault(name.rsplit("-", 1)[-1], []).append(name)

    def copy(row: dict[str, Any]) -> tuple[bool, list[str]]:
        name = row["file_name"].removeprefix(IMAGES_DIR + "/")
        flat = flat_by_item.get(name.rsplit("-", 1)[-1], [])
        if name in present and not flat:
            return False, []
        data = storage.read_bytes(sources[row["item_id"]])
        written = name not in present and storage.write_bytes_if_absent(prefix + name, data, _CONTENT_TYPES[name.rsplit(".", 1)[-1]])
        # A flat file is deleted only when it holds exactly this item's output: nothing is lost.
        return written, [f for f in flat if storage.read_bytes(prefix + f) == data]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(pool.map(copy, rows))
    result.written = sum(written for written, _ in outcomes)
    result.already_there = len(rows) - result.written
    flat_copies = sorted({f for _, found in outcomes for f in found})
    listed = {r["file_name"].removeprefix(IMAGES_DIR + "/") for r in rows}
    result.stale = sorted(f"{IMAGES_DIR}/{n}" for n in present - listed - set(flat_copies))
    return flat_copies


# --------------------------------------------------------------------------- the parquet form


def _metadata_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The metadata as one Arrow table (types inferred from every row, so every shard gets one schema)."""
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _shard_schema(metadata: pa.Schema) -> pa.Schema:
    """The shards' schema: ``image`` (the datasets ``Image`` struct: bytes, path) then every metadata column but ``file_name``."""
    import pyarrow as pa

    image = pa.field(IMAGE_COLUMN, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.schema([image, *(f for f in metadata if f.name != "file_name")], metadata={"huggingface": json.dumps(_HF_FEATURES)})


def shard_name(index: int, digest: str) -> str:
    """``data/train-{index:05d}-{sha256[:16]}.parquet``: named by its bytes, so a shard is never overwritten."""
    return f"{DATA_DIR}/train-{index:05d}-{digest[:16]}.parquet"


class _Shard:
    """One shard being built in memory: row groups are encoded as they fill, the images of one group held at a time."""

    def __init__(self, schema: pa.Schema):
        import pyarrow.parquet as pq

        self.schema = schema
        self.buffer = io.BytesIO()
        self.writer = pq.ParquetWriter(self.buffer, schema)
        self.group: list[dict[str, Any]] = []
        self.group_bytes = 0
        self.image_bytes = 0
        self.rows = 0

    def add(self, row: dict[str, Any], data: bytes) -> None:
        self.group.append({IMAGE_COLUMN: {"bytes": data, "path": row["file_name"]}, **{k: v for k, v in row.items() if k != "file_name"}})
        self.group_bytes += len(data)
        self.image_bytes += len(data)
        self.rows += 1
        if len(self.group) >= ROW_GROUP_ROWS or self.group_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.group:
            self.writer.write_table(pa.Table.from_pylist(self.group, schema=self.schema))
            self.group, self.group_bytes = [], 0

    def finish(self) -> bytes:
        self._flush()
        self.writer.close()
        return self.buffer.getvalue()


def _read_ahead(rows: list[dict[str, Any]], sources: dict[str, str], workers: int) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(row, image bytes) in row order, read ``workers`` at a time in parallel: a few images in memory, never all."""
    window = max(1, workers)
    with ThreadPoolExecutor(max_workers=window) as pool:
        for start in range(0, len(rows), window):
            part = rows[start : start + window]
            yield from zip(part, pool.map(lambda r: storage.read_bytes(sources[r["item_id"]]), part), strict=True)


def _write_shards(
    dest: str, rows: list[dict[str, Any]], sources: dict[str, str], schema: pa.Schema, max_shard_bytes: int, workers: int,
    result: ExportResult, record: _Record,
) -> None:  # fmt: skip
    """Stream the images into shards of at most ``max_shard_bytes`` image bytes, each written (and recorded) when full."""
    present = _listed(storage.join(dest, DATA_DIR) + "/")
    shard: _Shard | None = None

    def close(full: _Shard) -> None:
        data = full.finish()
        digest = hashlib.sha256(data).hexdigest()
        name = shard_name(len(result.shards), digest)
        written = name.removeprefix(DATA_DIR + "/") not in present and storage.write_bytes_if_absent(
            storage.join(dest, name), data, "application/vnd.apache.parquet"
        )
        result.shards.append(name)
        if written:
            result.written += full.rows
            record.shards[name] = digest
            record.write()  # vouch for it at once: a later export may delete it if this one stops here
        else:
            result.already_there += full.rows

    for row, data in _read_ahead(rows, sources, workers):
        if shard is not None and shard.rows and shard.image_bytes + len(data) > max_shard_bytes:
            close(shard)
            shard = None
        shard = shard or _Shard(schema)
        shard.add(row, data)
    if shard is not None:
        close(shard)
    listed = {n.removeprefix(DATA_DIR + "/") for n in result.shards}
    result.stale = sorted(f"{DATA_DIR}/{n}" for n in present - listed)


def _delete_unlisted_shards(dest: str, previous: _Previous, listed: set[str], record: _Record) -> set[str]:
    """Delete the shards an earlier export recorded and the new card no longer lists, when their bytes are the recorded ones.

    One whose bytes differ (someone's edit) is kept, no longer vouched for, and so reported as stale. Returns the names deleted.
    """
    deleted: set[str] = set()
    for name, digest in sorted(previous.shards.items()):
        if name in listed:
            continue
        uri = storage.join(dest, name)
        try:
            if storage.sha256_bytes(storage.read_bytes(uri)) == digest:
                storage.delete(uri)
                deleted.add(name)
        except storage.ObjectNotFound:
            deleted.add(name)
        record.shards.pop(name, None)
    return deleted


# --------------------------------------------------------------------------- what an export wrote


@dataclass
class _Previous:
    """What ``.nst-export.json`` vouches for in ``dest``, checked against the bytes there."""

    digests: dict[str, list[str]]  # export file present -> [its sha256], checked to be ours
    form: str | None  # the form of the export there (None: none)
    shards: dict[str, str]  # shard name -> sha256, as recorded (read back only to delete one)


class _Record:
    """``.nst-export.json``: the sha256 of each file the export wrote, its form, its shards."""

    def __init__(self, dest: str, form: str, previous: _Previous):
        self.uri = storage.join(dest, EXPORT_RECORD)
        self.form = form
        self.files: dict[str, list[str]] = dict(previous.digests)
        self.shards: dict[str, str] = dict(previous.shards)

    def write(self) -> None:
        body = {"form": self.form, "files": self.files, "shards": dict(sorted(self.shards.items()))}
        storage.write_bytes(self.uri, json.dumps(body, indent=2).encode(), "application/json")


def _check_ours(dest: str, form: str) -> _Previous:
    """What an earlier export left in ``dest``, once checked to be bytes an export wrote there, in the form asked for.

    Raises:
        ExportError: naming the files (or the other form), before anything is written.
    """
    try:
        recorded = json.loads(storage.read_bytes(storage.join(dest, EXPORT_RECORD), max_bytes=64 << 20))
    except storage.ObjectNotFound:
        recorded = {}
    except ValueError:
        recorded = {}  # an unreadable record vouches for nothing
    recorded = _mapping(recorded)
    files = _mapping(recorded.get("files"))
    foreign: list[str] = []
    present: dict[str, list[str]] = {}
    for name in _EXPORT_FILES:
        try:
            digest = storage.sha256_bytes(storage.read_bytes(storage.join(dest, name), max_bytes=1 << 30))
        except storage.ObjectNotFound:
            continue
        if digest not in (files.get(name) or []):
            foreign.append(name)
        else:
            present[name] = [digest]
    if foreign:
        raise ExportError(
            f"{storage.sanitize_uri(dest)} already holds {', '.join(foreign)} that no export wrote (or that was edited since); "
            "move it away or export to another folder"
        )
    # A record without a form is an image folder's: the only form before the parquet one.
    earlier = (recorded.get("form") or "imagefolder") if present else None
    if earlier is not None and earlier != form:
        raise ExportError(
            f"{storage.sanitize_uri(dest)} holds an export in the {earlier} form; export the {form} form to another folder "
            "(one folder holds one form, so load_dataset reads one dataset)"
        )
    clean = {str(n): str(d) for n, d in _mapping(recorded.get("shards")).items() if re.fullmatch(rf"{DATA_DIR}/train-\d{{5}}-[0-9a-f]{{16}}\.parquet", str(n))}
    return _Previous(digests=present, form=earlier, shards=clean)


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (a record someone mangled vouches for nothing)."""
    return value if isinstance(value, dict) else {}


def _in_columns(record: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """``record`` with every column, in the table's order (None where it has none)."""
    return {c: record.get(c) for c in columns}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    seen: set[str] = set()
    for row in rows:
        for key in row:
            if key not in seen and not key.startswith("meta_"):
                seen.add(key)
                columns.append(key)
    metas = sorted({k for row in rows for k in row if k.startswith("meta_")})
    return columns + metas


# --------------------------------------------------------------------------- dataset card


def md(value: Any) -> str:
    """User text made inert in Markdown and HTML: one line, markup characters escaped."""
    text = " ".join(str("" if value is None else value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]{}()#+!|~])", r"\\\1", text)


def code(value: Any) -> str:
    """User text as an inline code span, safe inside a Markdown table."""
    text = " ".join(str("" if value is None else value).split()).replace("`", "'").replace("|", "\\|")
    return f"`{text}`"


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def _table(header: tuple[str, str], counts: Counter[str], limit: int = 50) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    for value, n in counts.most_common(limit):
        lines.append(f"| {md(value) or '(blank)'} | {n} |")
    if len(counts) > limit:
        lines.append(f"| ... {len(counts) - limit} more | |")
    return lines


def dataset_card(rows: list[dict[str, Any]], runs: list[Run], only: str | None, form: str = "imagefolder", shards: list[str] | None = None) -> str:
    """The dataset card: YAML (its ``configs`` name the data files of ``form``, so ``load_dataset(dest)`` reads it), then Markdown."""
    n = len(rows)
    weights = Counter(str(r.get("weights_id")) for r in rows)
    random = sorted(w for w in weights if w.startswith("random:"))
    param_names = [c for c in (rows[0] if rows else {}) if c not in _NON_PARAM_FIELDS and not c.startswith(("meta_", "loss_"))]
    lines = [
        "---",
        "pretty_name: Neural style transfer outputs",
        "task_categories:",
        "- image-to-image",
        "tags:",
        "- neural-style-transfer",
        "- synthetic",
        "size_categories:",
        f"- {_size_category(n)}",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path:",
        *(f"    - {p}" for p in _data_files(form, shards or [])),
        "---",
        "",
        "# Neural style transfer outputs",
        "",
        f"{n} stylised image{'s' if n != 1 else ''} made with nst-bulk: the Gatys et al. (2015) optimisation "
        "(\"A Neural Algorithm of Artistic Style\") on VGG-19 features, each output matching a content image's "
        "features and a style image's Gram matrices.",
        "",
        f"Exported {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from {len(runs)} run{'s' if len(runs) != 1 else ''}"
        + (" keeping only items every reviewer kept (`--only kept`)." if only == "kept" else " (every finished item, reviewed or not; see the `decision` column)."),
        "",
    ]
    if random:
        lines += [
            f"> **WARNING: untrained random VGG-19 weights ({md(', '.join(random))}).** These images come from a network",
            "> that was never trained: they exercise the pipeline and are not ImageNet-quality style transfer.",
            "",
        ]
    lines += _layout(form, len(shards or []))
    lines += ["## Runs", ""] + [f"- {code(r.name)}: {md(r.shown_uri)}" for r in runs] + [""]
    lines += ["## Weights", ""] + _table(("weights", "images"), weights) + [""]
    judges = Counter(str(r.get("judge_weights")) for r in rows if r.get("judge_weights"))
    if judges:
        lines += [
            "Quality columns `style_distance` and `content_distance` (lower is better) are measured with a VGG-19 whose "
            f"weights differ from the ones optimised against: {md(', '.join(judges))}.",
            "",
        ]
    lines += ["## What was stylised with what", ""]
    lines += _table(("style image (a blend: every style, +)", "images"), Counter(" + ".join(r.get("style_uris") or []) for r in rows)) + [""]
    masked = Counter(" + ".join(r["mask_uris"]) for r in rows if r.get("mask_uris"))
    if masked:
        lines += _table(("style masks", "images"), masked) + [""]
    lines += _table(("content image", "images"), Counter(str(r.get("content_uri")) for r in rows)) + [""]
    lines += ["## Parameters", "", "| parameter | values (images) |", "|---|---|"]
    for name in param_names:
        counts = Counter(json.dumps(r.get(name)) for r in rows)
        shown = ", ".join(f"{md(json.loads(v))} ({c})" if len(counts) > 1 else md(json.loads(v)) for v, c in counts.most_common(10))
        lines.append(f"| {md(name)} | {shown or '(none)'} |")
    lines.append("")
    licence_columns = sorted({k for r in rows for k in r if k.startswith("meta_") and _LICENCE_WORDS.search(k)})
    lines += ["## Licences and sources", ""]
    if licence_columns:
        lines.append("The licence of an output follows from its content and style images; these manifest columns say what they are:")
        lines.append("")
        for column in licence_columns:
            lines += [f"### {code(column)}", ""] + _table(("value", "images"), Counter(str(r.get(column) or "") for r in rows)) + [""]
    else:
        lines += ["The manifests had no licence column (`meta_licence` or similar): check the licences of the content and style images listed above before sharing.", ""]
    metas = sorted({k for r in rows for k in r if k.startswith("meta_")})
    lines += ["## Fields", "", "| field | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in _FIELD_DOCS.items()]
    if param_names:
        lines.append(f"| {', '.join(code(p) for p in param_names)} | style parameters of the item (lists `\\|`-separated) |")
    lines.append("| `loss_*` | final loss terms (`loss_total` weighted; the others unweighted) |")
    if metas:
        lines.append(f"| {', '.join(code(m) for m in metas)} | the manifest's own `meta_*` columns, as written |")
    lines.append("")
    return "\n".join(lines)


def _data_files(form: str, shards: list[str]) -> list[str]:
    """What the card's ``configs`` name: the metadata table and the images in their folders, or each shard (never a stale one)."""
    return [METADATA_PARQUET, f"{IMAGES_DIR}/*/*"] if form == "imagefolder" else list(shards)


def _layout(form: str, n_shards: int) -> list[str]:
    """The card's layout and how to load it (and an S3 copy of it)."""
    if form == "imagefolder":
        files = [f"{IMAGES_DIR}/<item id[:2]>/<id>-<item id[:12]>.<ext>   one file per distinct item (content-addressed), 256 folders",
                 f"{METADATA_JSONL}    one line per image: file_name and every field below",
                 f"{METADATA_PARQUET}  the same table, one row per image"]  # fmt: skip
        how = "the YAML above selects metadata.parquet + images/*/*"
    else:
        files = [f"{DATA_DIR}/train-<k>-<sha256>.parquet   {n_shards} shard(s): column `image` (bytes + path) and every field below",
                 f"{METADATA_PARQUET}  the table without the images, one row per image"]  # fmt: skip
        how = "the YAML above lists the shards; `image` decodes to PIL"
    return ["## Layout", "", "```", *files, f"{CARD}  this card", "```", "",
            "```python", "from datasets import load_dataset", f'ds = load_dataset("path/to/this/folder")  # {how}',
            "import pandas as pd", f'table = pd.read_parquet("path/to/this/folder/{METADATA_PARQUET}")', "```", "",
            "From S3, copy the prefix first, then load the copy: `aws s3 sync s3://bucket/prefix ./folder`.", ""]  # fmt: skip


_FIELD_DOCS = {
    "file_name": "the image, relative to this folder (parquet form: the `image` column's `path`)",
    "id": "the manifest id of the first row that produced the image",
    "row": "that row's number in its manifest (1 = first data row)",
    "run": "that row's run",
    "item_id": "content address of the image: sha256 of the inputs, parameters, weights and engine version",
    "decision": "review verdict: kept, rejected, disputed or undecided",
    "content_uri": "content image", "style_uri": "the (first) style image", "style_uris": "every style image, in blend order",
    "style_weights": "each style's blend weight, normalised to sum 1", "mask_uris": "each style's mask image (empty: no masks)",
    "init_uri": "start image, when one was given",
    "content_sha256": "sha256 of the content file", "style_sha256": "sha256 of the (first) style file",
    "style_sha256s": "sha256 of each style file", "mask_sha256s": "sha256 of each mask file",
    "weights_id": "VGG-19 weights optimised against", "weights_random": "true for untrained random:N weights",
    "compute_device": "where it was computed", "iterations_run": "loss evaluations done", "stop_reason": "why it stopped",
    "wall_time_s": "optimisation time in seconds",
    "style_distance": "quality: style distance judged by other weights (lower is better)",
    "content_distance": "quality: content distance judged by other weights (lower is better)",
    "judge_weights": "weights of the judging VGG-19", "engine_version": "algorithm version", "created_at": "when it was computed (UTC)",
    "reviews": "latest decision of each reviewer", "sources": "every (run, row, id) that produced this image",
}  # fmt: skip
_NON_PARAM_FIELDS = frozenset(_FIELD_DOCS)
