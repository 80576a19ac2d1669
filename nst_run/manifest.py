"""Manifests: a CSV of (content, style, parameters) rows, parsed and validated before any work.

Columns:

* required ``content_uri``, ``style_uri`` (``style_uri`` may list several
  styles, ``a.jpg|b.jpg``, blended by ``style_blend_weights`` or placed by
  ``style_masks``);
* optional ``id`` (unique; defaults to the row number);
* any :class:`~nst_core.params.StyleParams` field (a blank cell means the
  run's default; lists ``|``-separated);
* any number of ``meta_*`` columns, carried untouched into ``meta.json``, the
  results and exports.

Any other column fails the whole manifest at once, as do an empty file, a file
that is not UTF-8 CSV, and a missing required column (:class:`ManifestError`).
The encoding is a property of the file, so one non-UTF-8 byte fails the whole
manifest too, with one error naming the line and byte (and saying how to fix
it), never a ``UnicodeDecodeError``.
A bad *row* never stops the others: it becomes an :class:`InvalidRow` with its
row number (1 = the first data row, the header not counted), the column at
fault and the reason (with the offending cell for a value of the wrong type or
out of bounds).

Ids are labels, not paths: any printable text (``../../etc`` included; items
are stored by ``item_id`` and exports make safe file names), but control,
bidirectional-override and line-separator characters are refused in ids and
URIs. Cells are kept as written (formulas such as ``=HYPERLINK(...)``
included); the results CSV neutralises them (:func:`nst_run.results.csv_safe`).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from nst_core import storage
from nst_core.errors import NSTError
from nst_core.params import StyleInputsError, StyleParams, input_role

REQUIRED_COLUMNS = ("content_uri", "style_uri")
ID_COLUMN = "id"
META_PREFIX = "meta_"
MAX_ID_LENGTH = 200
MAX_URI_LENGTH = 2048
MAX_SHOWN_VALUE = 60  # characters of an offending cell quoted in a reason
MAX_MANIFEST_BYTES = 256 << 20  # refused unread above this (a 100,000-row manifest is ~30 MB)

# Characters refused in ids and URIs: C0/C1 controls and DEL, bidirectional overrides and isolates (text
# that displays differently from what it is), line/paragraph separators and the zero-width no-break space.
_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ufeff]")
# "s3:/bucket/key", "s3:bucket/key", "https:/host", "s3//bucket", "s3 ://bucket", "s3: //bucket":
# a URI with a broken "://", not a local file name.
_MALFORMED_SCHEME = re.compile(r"^(s3[an]?|file|https?|ftp|gs|gcs|az|abfss?|wasbs?|hdfs)(?::(?!//)|\s+:|//)", re.IGNORECASE)


class ManifestError(NSTError):
    """The manifest as a whole cannot be used."""


@dataclass(frozen=True)
class RowSpec:
    """One valid manifest row: what to stylise, with which effective parameters."""

    row: int
    id: str
    content_uri: str
    style_uri: str
    params: StyleParams
    meta: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # the row's own parameter cells

    @property
    def style_uris(self) -> tuple[str, ...]:
        """The row's style images (``style_uri`` lists several separated by ``|``)."""
        return tuple(self.style_uri.split("|"))

    def style_roles(self) -> list[str]:
        return [input_role("style", k) for k in range(len(self.style_uris))]

    def mask_roles(self) -> list[str]:
        return [input_role("style_mask", k) for k in range(len(self.params.style_masks or ()))]

    def input_uris(self) -> dict[str, str]:
        """Every input file of this row, by role: content, style[_k], style_mask[_k], init."""
        uris = {"content": self.content_uri, **dict(zip(self.style_roles(), self.style_uris, strict=True))}
        uris.update(zip(self.mask_roles(), self.params.style_masks or (), strict=True))
        if self.params.init_is_image:
            uris["init"] = self.params.init
        return uris


@dataclass(frozen=True)
class InvalidRow:
    row: int
    id: str
    column: str
    reason: str
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> str:
        return f"row {self.row}, column {self.column}: {storage.sanitize_uri(self.reason)}"  # reasons quote cells


@dataclass
class Manifest:
    rows: list[RowSpec]
    invalid: list[InvalidRow]
    columns: list[str]

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.invalid)


def decode_csv(data: bytes, source: str) -> tuple[list[str], list[dict[str, str]]]:
    """UTF-8 CSV bytes -> (column names, rows as dicts of strings); a header row is required.

    Each row dict also carries ``__row__`` (its number) and, for a malformed
    row, ``__bad__`` (the reason).
    """
    if not data.strip():
        raise ManifestError(f"manifest {source}: the file is empty")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError(f"manifest {source}: UTF-16 text; save the manifest as UTF-8 CSV ('CSV UTF-8' in spreadsheet programs)")
    if b"\x00" in data[:4096]:
        raise ManifestError(f"manifest {source}: not a CSV file (binary content)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(_not_utf8(data, exc.start, source)) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        # pandas would do, but the csv module is ~5x faster for all-string tables and keeps
        # the cells exactly as written (no NaN, no type guessing).
        header = next(reader, None)
        records = list(reader)
    except csv.Error as exc:
        raise ManifestError(f"manifest {source}: not a valid CSV file at line {reader.line_num} ({exc})") from None
    if not header or not any(h.strip() for h in header):
        raise ManifestError(f"manifest {source}: no header row")
    names = [h.strip() for h in header]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ManifestError(f"manifest {source}: duplicate column(s) {', '.join(dupes)}")
    rows = []
    number = 0  # rows count data rows: blank lines neither take a number nor count towards max_items
    for record in records:
        if not any(cell.strip() for cell in record):
            continue  # blank line
        number += 1
        if len(record) != len(names):
            rows.append({"__bad__": f"has {len(record)} cells, the header has {len(names)}", "__row__": str(number)})
            continue
        rows.append({**dict(zip(names, record, strict=True)), "__row__": str(number)})
    return names, rows


def _not_utf8(data: bytes, offset: int, source: str) -> str:
    """One line naming the first non-UTF-8 byte's line, and how many lines have such bytes."""
    line = data.count(b"\n", 0, offset) + 1
    bad_lines = 0
    for raw in data.split(b"\n"):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines += 1
    more = f" ({bad_lines} lines have such bytes)" if bad_lines > 1 else ""
    return (
        f"manifest {source}: not UTF-8 text: invalid byte 0x{data[offset]:02x} at line {line} (byte offset {offset}){more}; "
        "save the manifest as UTF-8 CSV ('CSV UTF-8' in spreadsheet programs)"
    )


def _shown(value: str) -> str:
    """A cell as quoted in a reason: repr, cut to MAX_SHOWN_VALUE characters."""
    value = storage.sanitize_uri(value)  # a cell may hold credentials, whatever its column
    return repr(value if len(value) <= MAX_SHOWN_VALUE else value[:MAX_SHOWN_VALUE] + "...")


def check_columns(columns: list[str], source: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"manifest {source}: missing required column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})"
        )
    allowed = {ID_COLUMN, *REQUIRED_COLUMNS, *StyleParams.model_fields}
    unknown = [c for c in columns if c not in allowed and not c.startswith(META_PREFIX)]
    if unknown:
        raise ManifestError(
            f"manifest {source}: unknown column(s) {', '.join(unknown)}; allowed are id, content_uri, style_uri, "
            "style parameters (e.g. size, iterations, style_weight) and meta_* columns"
        )


def check_uri(uri: str, *, allow_local_paths: bool, base_dir: str | None = None) -> str:
    """Validate one input URI's syntax and scheme; returns it normalised (relative paths resolved).

    Raises ``ValueError`` with the reason.
    """
    uri = uri.strip()
    if not uri:
        raise ValueError("is empty")
    if len(uri) > MAX_URI_LENGTH:
        raise ValueError(f"is longer than {MAX_URI_LENGTH} characters")
    if _UNSAFE_CHARS.search(uri):
        raise ValueError("contains control or invisible formatting characters")
    if malformed := _MALFORMED_SCHEME.match(uri):
        scheme = malformed.group(1)
        raise ValueError(f"is a malformed URI (write {scheme.lower()}://...)")  # not echoed: it may hold user:password@
    if "|" in uri:
        raise ValueError("lists several URIs ('|'); only style_uri (and style_masks) may list several images")
    try:
        parsed = storage.parse_uri(uri)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if parsed.scheme == "s3":
        if not parsed.key or parsed.key.endswith("/"):
            raise ValueError(f"{storage.sanitize_uri(uri)} names no object")
        return uri
    if not allow_local_paths:
        shown = storage.sanitize_uri(uri)  # a pasted presigned URL without its scheme keeps its signature after '?'
        shown = shown if len(shown) <= 200 and shown == uri else shown[:200] + "..."
        raise ValueError(f"local path {shown!r} refused: allow_local_paths is off (only s3:// URIs are allowed)")
    path = uri.removeprefix("file://")
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    return path


def check_style_uris(value: str, *, allow_local_paths: bool, base_dir: str | None = None) -> str:
    """``style_uri``: one URI, or several separated by ``|``; returns them normalised, ``|``-joined.

    Raises ``ValueError`` with the reason (naming which style when there are several).
    """
    parts = [part.strip() for part in value.split("|")]
    checked = []
    for k, part in enumerate(parts):
        try:
            checked.append(check_uri(part, allow_local_paths=allow_local_paths, base_dir=base_dir))
        except ValueError as exc:
            raise ValueError(f"{exc}" if len(parts) == 1 else f"(style {k + 1} of {len(parts)}) {exc}") from None
    return "|".join(checked)


def _row_params(
    values: dict[str, str], defaults: dict[str, Any], cache: dict[tuple[tuple[str, str], ...], StyleParams | ValidationError]
) -> StyleParams:
    key = tuple(sorted(values.items()))
    if key not in cache:
        try:
            cache[key] = StyleParams.model_validate({**defaults, **values})
        except ValidationError as exc:
            cache[key] = exc
    result = cache[key]
    if isinstance(result, ValidationError):
        raise result
    return result


def parse_manifest(
    data: bytes,
    *,
    source: str = "manifest",
    defaults: StyleParams | None = None,
    allow_local_paths: bool = True,
    base_dir: str | None = None,
    max_items: int | None = None,
) -> Manifest:
    """Parse and validate every row. Raises :class:`ManifestError` for an unusable file."""
    columns, records = decode_csv(data, source)
    check_columns(columns, source)
    if not records:
        raise ManifestError(f"manifest {source}: no data rows")
    param_columns = [c for c in columns if c in StyleParams.model_fields]
    meta_columns = [c for c in columns if c.startswith(META_PREFIX)]
    default_values = (defaults or StyleParams()).model_dump()
    cache: dict[tuple[tuple[str, str], ...], StyleParams | ValidationError] = {}
    seen_ids: dict[str, int] = {}
    rows: list[RowSpec] = []
    invalid: list[InvalidRow] = []
    for record in records:
        number = int(record["__row__"])
        if max_items is not None and number > max_items:
            break
        meta = {c: record.get(c, "") for c in meta_columns}
        row_id = (record.get(ID_COLUMN) or "").strip() or str(number)

        def refuse(column: str, reason: str) -> None:
            invalid.append(InvalidRow(number, row_id, column, reason, meta))  # noqa: B023 - called in this iteration only

        if "__bad__" in record:
            refuse("*", record["__bad__"])
            continue
        if len(row_id) > MAX_ID_LENGTH or _UNSAFE_CHARS.search(row_id):
            row_id = _UNSAFE_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", row_id)[:MAX_ID_LENGTH]  # shown escaped
            refuse(ID_COLUMN, f"id must be at most {MAX_ID_LENGTH} printable characters (no control or invisible formatting characters)")
            continue
        if row_id in seen_ids:
            refuse(ID_COLUMN, f"duplicate id {row_id!r} (first used at row {seen_ids[row_id]})")
            continue
        seen_ids[row_id] = number
        uris: dict[str, str] = {}
        bad = False
        for column in REQUIRED_COLUMNS:
            check = check_style_uris if column == "style_uri" else check_uri
            try:
                uris[column] = check(record[column], allow_local_paths=allow_local_paths, base_dir=base_dir)
            except ValueError as exc:
                refuse(column, f"{column} {exc}")
                bad = True
                break
        if bad:
            continue
        overrides = {c: record[c].strip() for c in param_columns if record[c].strip()}
        try:
            params = _row_params(overrides, default_values, cache)
        except ValidationError as exc:
            err = exc.errors()[0]
            column = next((str(p) for p in err["loc"] if isinstance(p, str)), "parameters")
            reason = err["msg"].removeprefix("Value error, ")
            if err["type"] != "value_error" and column in overrides:  # pydantic's own words do not quote the cell
                reason += f" (got {_shown(overrides[column])})"
            refuse(column, reason)
            continue
        if params.init_is_image:
            try:
                init = check_uri(params.init, allow_local_paths=allow_local_paths, base_dir=base_dir)
                if init != params.init:
                    params = params.with_overrides(init=init)
            except ValueError as exc:
                refuse("init", f"init {exc}")
                continue
        try:
            params.check_styles(len(uris["style_uri"].split("|")))
        except StyleInputsError as exc:
            refuse(exc.field, str(exc))
            continue
        if params.style_masks is not None:
            try:
                masks = tuple(check_uri(m, allow_local_paths=allow_local_paths, base_dir=base_dir) for m in params.style_masks)
                if masks != params.style_masks:
                    params = params.with_overrides(style_masks=masks)
            except ValueError as exc:
                refuse("style_masks", f"style_masks {exc}")
                continue
        if params.weights not in ("imagenet",) and not params.weights.startswith("random:"):
            try:
                weights = check_uri(params.weights, allow_local_paths=allow_local_paths, base_dir=base_dir)
                if weights != params.weights:
                    params = params.with_overrides(weights=weights)
            except ValueError as exc:
                refuse("weights", f"weights {exc}")
                continue
        rows.append(RowSpec(number, row_id, uris["content_uri"], uris["style_uri"], params, meta, overrides))
    return Manifest(rows=rows, invalid=invalid, columns=columns)


def load_manifest(uri: str, **kwargs: Any) -> Manifest:
    """Read a manifest from a path or ``s3://`` URI and parse it.

    Relative paths inside a local manifest are resolved against its folder.
    """
    allow_local = kwargs.get("allow_local_paths", True)
    if storage.is_local(uri) and not allow_local:
        raise ManifestError(f"manifest {uri}: local paths are refused (allow_local_paths is off)")
    data = storage.read_bytes(uri, max_bytes=MAX_MANIFEST_BYTES)
    base_dir = os.path.dirname(os.path.abspath(uri.removeprefix("file://"))) if storage.is_local(uri) else None
    return parse_manifest(data, source=storage.sanitize_uri(uri), base_dir=base_dir, **kwargs)
