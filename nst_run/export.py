"""Export stored runs as a Hugging Face image-folder dataset.

``export_dataset([run, ...], dest)`` writes, to a local folder or an
``s3://`` prefix::

    {dest}/images/{safe id}-{item id[:12]}.{png|jpg|webp}
    {dest}/metadata.jsonl      one line per image: file_name + every metadata field
    {dest}/metadata.parquet    the same table, one row per image
    {dest}/README.md           dataset card (YAML header + what, with what, parameters, weights, sources, licences)
    {dest}/.nst-export.json    the sha256 of the three files above as this module last wrote them

An export never overwrites a ``README.md`` or metadata file it did not write:
one whose bytes differ from what ``.nst-export.json`` records (a card someone
wrote or edited, another tool's metadata) stops the export before anything is
written (:class:`ExportError`, CLI exit 2).

Images are named by the manifest ``id`` (made safe for any file system: no
``/``, no ``..``, no leading dot, no control characters; at most 80
characters) followed by the first 12 hex digits of the ``item_id``, the
content address of the image. One item is one image however many rows or
runs produced it: rows that share it are listed in its ``sources`` field, and
an image already in ``dest`` is not written again, so exporting several runs
(or exporting again) never duplicates an image.

Hugging Face's image-folder loader refuses a folder with metadata files of two
formats, so the card's YAML ``configs`` names ``metadata.jsonl`` and
``images/*`` as the data files: ``datasets.load_dataset(dest)`` reads it (as
does the Hub), and ``pandas.read_parquet(dest + "/metadata.parquet")`` gives
the same table.

With ``only="kept"`` only items whose verdict is ``kept`` (every reviewer's
latest decision is keep; see :mod:`nst_run.review`) are exported. No Prefect
here; every URI written is passed through :func:`nst_core.storage.sanitize_uri`.
"""

from __future__ import annotations

import io
import json
import math
import re
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nst_core import storage
from nst_core.params import EXECUTION_FIELDS
from nst_run import paths
from nst_run.results import ReviewError, Run, finite_number, open_run
from nst_run.review import Decision, latest_per_reviewer, load_decisions, verdict

IMAGES_DIR = "images"
EXPORT_RECORD = ".nst-export.json"
_EXPORT_FILES = ("metadata.jsonl", "metadata.parquet", "README.md")
ONLY_CHOICES = ("kept",)
MAX_STEM = 80
_IGNORED_PARAMS = EXECUTION_FIELDS  # how an item ran, not what it made: not exported as parameters
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
    if not re.fullmatch(r"[0-9a-f]{12,64}", item_id):
        raise ExportError(f"not an item id: {item_id!r}")
    if ext not in _CONTENT_TYPES:
        raise ExportError(f"unexpected image extension {ext!r}")
    return f"{IMAGES_DIR}/{safe_stem(manifest_id)}-{item_id[:12]}.{ext}"


def _param_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ExportResult:
    dest: str
    images: int = 0
    written: int = 0
    already_there: int = 0
    runs: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows
    stale: list[str] = field(default_factory=list)  # files in images/ that this export does not list
    files: dict[str, str] = field(default_factory=dict)


def _record(run: Run, row: dict[str, Any], meta: dict[str, Any], file_name: str, decisions: list[Decision]) -> dict[str, Any]:
    inputs = meta.get("inputs") or {}
    params = meta.get("params") or {}
    weights = meta.get("weights") or {}
    quality = meta.get("quality") or {}
    record: dict[str, Any] = {
        "file_name": file_name,
        "id": str(row.get("id")),
        "row": row.get("row"),
        "run": run.name,
        "item_id": str(meta.get("item_id") or row.get("item_id")),
        "decision": verdict(decisions),
        "content_uri": storage.sanitize_uri((inputs.get("content") or {}).get("uri") or row.get("content_uri") or ""),
        "style_uri": storage.sanitize_uri((inputs.get("style") or {}).get("uri") or row.get("style_uri") or ""),
        "init_uri": storage.sanitize_uri((inputs.get("init") or {}).get("uri")) if inputs.get("init") else None,  # type: ignore[arg-type]
        "content_sha256": (inputs.get("content") or {}).get("sha256"),
        "style_sha256": (inputs.get("style") or {}).get("sha256"),
        "weights_id": weights.get("id") or row.get("weights_id"),
        "weights_random": bool(weights.get("random", str(weights.get("id", "")).startswith("random:"))),
    }
    for name, value in params.items():
        if name in _IGNORED_PARAMS or name in record:
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


def export_dataset(run_uris: list[str], dest_uri: str, *, only: str | None = None, workers: int = 8) -> ExportResult:
    """Write the done items of one or more runs as an image-folder dataset at ``dest_uri``."""
    if not run_uris:
        raise ExportError("export needs at least one run")
    if only is not None and only not in ONLY_CHOICES:
        raise ExportError(f"--only: {only!r} is not one of {', '.join(ONLY_CHOICES)}")
    dest = str(dest_uri).rstrip("/") or str(dest_uri)
    storage.parse_uri(dest)  # refuses unsupported schemes before any work
    # Oldest run first (run folders are named by their UTC start time), whatever the order given:
    # the earliest id of an item names its image, so exporting again never renames it.
    runs = sorted((open_run(uri) for uri in run_uris), key=lambda r: r.name)
    if len({r.folder for r in runs}) != len(runs):
        raise ExportError("a run is listed twice")
    result = ExportResult(dest=storage.sanitize_uri(dest), runs=[r.shown_uri for r in runs])
    present_digests = _check_ours(dest)

    # Every decision about an item, from every run given, decides its verdict.
    all_decisions: dict[str, list[Decision]] = {}
    for run in runs:
        for item, found in load_decisions(run, workers=workers).items():
            all_decisions.setdefault(item, []).extend(found)

    records: dict[str, dict[str, Any]] = {}  # item id -> record, in first-seen order
    sources: dict[str, str] = {}  # item id -> image URI to copy from
    for run in runs:
        done = run.done_rows()
        done_rows = {id(r) for r in done}
        result.skipped.update(f"status {r.get('status')}" for r in run.rows if id(r) not in done_rows)
        fresh = sorted({str(r["item_id"]) for r in done} - set(records))

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
            metas = dict(pool.map(read_meta, fresh))
        for row in done:
            item = str(row["item_id"])
            if item in records:
                source = {"run": run.name, "row": row.get("row"), "id": str(row.get("id"))}
                if source not in records[item]["sources"]:
                    records[item]["sources"].append(source)
                continue
            meta = metas.get(item)
            if meta is None:
                result.skipped["item files missing"] += 1
                continue
            decisions = all_decisions.get(item, [])
            if only == "kept" and verdict(decisions) != "kept":
                result.skipped[f"not kept ({verdict(decisions)})"] += 1
                continue
            image = str((meta.get("outputs") or {}).get("image") or paths.image_name())
            ext = image.rsplit(".", 1)[-1].lower()
            if "/" in image or ext not in _CONTENT_TYPES:
                result.skipped["unexpected output file name"] += 1
                continue
            folder = run.item_folder(item)
            assert folder is not None
            records[item] = _record(run, row, meta, image_file_name(str(row.get("id")), item, ext), decisions)
            sources[item] = storage.join(folder, image)

    try:
        present = {u.rsplit("/", 1)[-1] for u in storage.list_prefix(storage.join(dest, IMAGES_DIR) + "/")}
    except storage.StorageError:
        present = set()

    def copy(item: str) -> bool:
        name = records[item]["file_name"].split("/", 1)[1]
        if name in present:
            return False
        data = storage.read_bytes(sources[item])
        ext = name.rsplit(".", 1)[-1]
        return storage.write_bytes_if_absent(storage.join(dest, IMAGES_DIR, name), data, _CONTENT_TYPES[ext])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        written = list(pool.map(copy, list(records)))
    result.images = len(records)
    result.written = sum(written)
    result.already_there = result.images - result.written
    listed = {r["file_name"].split("/", 1)[1] for r in records.values()}
    result.stale = sorted(present - listed)

    rows = list(records.values())
    columns = _columns(rows)
    rows = [{c: r.get(c) for c in columns} for r in rows]
    jsonl = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode("utf-8")
    result.files = {
        "metadata_jsonl": storage.join(dest, "metadata.jsonl"),
        "metadata_parquet": storage.join(dest, "metadata.parquet"),
        "card": storage.join(dest, "README.md"),
    }
    contents = {
        "metadata.jsonl": (jsonl, "application/jsonl"),
        "metadata.parquet": (_parquet(rows, columns), "application/vnd.apache.parquet"),
        "README.md": (dataset_card(rows, runs, only).encode("utf-8"), "text/markdown; charset=utf-8"),
    }
    new_digests = {name: storage.sha256_bytes(data) for name, (data, _) in contents.items()}
    record_uri = storage.join(dest, EXPORT_RECORD)

    def write_record(digests: dict[str, list[str]]) -> None:
        storage.write_bytes(record_uri, json.dumps({"files": digests}, indent=2).encode(), "application/json")

    # Old and new bytes both vouched for while the files are replaced, so a crash between the writes
    # leaves nothing the next export would take for someone else's file.
    write_record({name: sorted({d, *present_digests.get(name, [])}) for name, d in new_digests.items()})
    for name, (data, content_type) in contents.items():
        storage.write_bytes(storage.join(dest, name), data, content_type)
    write_record({name: [d] for name, d in new_digests.items()})
    result.files = {k: storage.sanitize_uri(v) for k, v in result.files.items()}
    return result


def _check_ours(dest: str) -> dict[str, list[str]]:
    """The sha256 of each export file present in ``dest``, once checked to be bytes an export wrote there.

    Raises:
        ExportError: naming the files, before anything is written.
    """
    try:
        recorded = json.loads(storage.read_bytes(storage.join(dest, EXPORT_RECORD), max_bytes=1 << 20)).get("files") or {}
    except storage.ObjectNotFound:
        recorded = {}
    except (ValueError, AttributeError):
        recorded = {}  # an unreadable record vouches for nothing
    foreign: list[str] = []
    present: dict[str, list[str]] = {}
    for name in _EXPORT_FILES:
        try:
            digest = storage.sha256_bytes(storage.read_bytes(storage.join(dest, name), max_bytes=1 << 30))
        except storage.ObjectNotFound:
            continue
        if not isinstance(recorded, dict) or digest not in (recorded.get(name) or []):
            foreign.append(name)
        else:
            present[name] = [digest]
    if foreign:
        raise ExportError(
            f"{storage.sanitize_uri(dest)} already holds {', '.join(foreign)} that no export wrote (or that was edited since); "
            "move it away or export to another folder"
        )
    return present


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


def _parquet(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=columns)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


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


def dataset_card(rows: list[dict[str, Any]], runs: list[Run], only: str | None) -> str:
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
        "    - metadata.jsonl",
        "    - images/*",
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
    lines += ["## Layout", "", "```", "images/<id>-<item id>.<ext>   one file per distinct item (content-addressed)",
              "metadata.jsonl                one line per image: file_name and every field below",
              "metadata.parquet              the same table, one row per image", "README.md                     this card", "```", "",
              "```python", "from datasets import load_dataset", "ds = load_dataset(\"path/to/this/folder\")  # the YAML above selects metadata.jsonl + images/",
              "import pandas as pd", "table = pd.read_parquet(\"path/to/this/folder/metadata.parquet\")", "```", ""]  # fmt: skip
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
    lines += _table(("style image", "images"), Counter(str(r.get("style_uri")) for r in rows)) + [""]
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


_FIELD_DOCS = {
    "file_name": "the image, relative to this folder",
    "id": "the manifest id of the first row that produced the image",
    "row": "that row's number in its manifest (1 = first data row)",
    "run": "that row's run",
    "item_id": "content address of the image: sha256 of the inputs, parameters, weights and engine version",
    "decision": "review verdict: kept, rejected, disputed or undecided",
    "content_uri": "content image", "style_uri": "style image", "init_uri": "start image, when one was given",
    "content_sha256": "sha256 of the content file", "style_sha256": "sha256 of the style file",
    "weights_id": "VGG-19 weights optimised against", "weights_random": "true for untrained random:N weights",
    "compute_device": "where it was computed", "iterations_run": "loss evaluations done", "stop_reason": "why it stopped",
    "wall_time_s": "optimisation time in seconds",
    "style_distance": "quality: style distance judged by other weights (lower is better)",
    "content_distance": "quality: content distance judged by other weights (lower is better)",
    "judge_weights": "weights of the judging VGG-19", "engine_version": "algorithm version", "created_at": "when it was computed (UTC)",
    "reviews": "latest decision of each reviewer", "sources": "every (run, row, id) that produced this image",
}  # fmt: skip
_NON_PARAM_FIELDS = frozenset(_FIELD_DOCS)
