"""The run report: one static HTML page per run, rebuilt from stored metadata alone.

``build_report(run_uri)`` reads a run folder (``results.parquet``,
``summary.json``, each item's ``meta.json`` and ``loss.csv``, the decisions
under ``decisions/``) and writes, beside them::

    {run}/report.html
    {run}/thumbs/in-<sha256 of the input file>-<px>.jpg    content and style thumbnails
    {run}/thumbs/out-<item id>-<px>.jpg                   output thumbnails

Thumbnail names are content addresses: an input used by a hundred rows is
thumbnailed once, and a rebuild only makes the thumbnails that are missing.
The page links them relatively and loads nothing else (its Content Security
Policy allows no network access and only its own inline script and style,
by hash), so any copy of the run folder, local or synced from S3, opens as
is. Every value that came from a manifest (ids, ``meta_*`` cells, URIs,
errors) is HTML-escaped, and every URI is passed through
:func:`nst_core.storage.sanitize_uri`: no query string, so no presigned URL or
credential, is ever written.

One card per manifest row: content, style and output thumbnails, the loss
curve (inline SVG from ``loss.csv``), the parameters that differ from the
run's defaults, the final loss terms, the quality score (style and content
distances judged by a VGG-19 with other weights; lower is better), duration,
status, error and the reviewers' decisions. The page sorts and filters by
status, style, parameter, decision, loss and score, and lets a reviewer mark
keep/reject on the cards and save the marks as a file for
``nst review RUN --from-file FILE``.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import html
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from nst_core import storage
from nst_core.params import EXECUTION_FIELDS
from nst_run import paths
from nst_run.paths import REPORT_FILE, THUMBS_DIR
from nst_run.results import Run, finite_number, open_run, run_folder
from nst_run.review import BULK_FORMAT, VERDICTS, Decision, latest_per_reviewer, load_decisions, verdict
from nst_run.status import ALWAYS_SHOWN_STATUSES, DONE_STATUSES, STATUSES

INPUT_THUMB_PX = 240
OUTPUT_THUMB_PX = 480
# Parameters that never change an output: not compared, not filtered on.
_IGNORED_PARAMS = EXECUTION_FIELDS
_CURVE_TERMS = ("total", "content", "style", "tv")


# --------------------------------------------------------------------------- values


def fmt_num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def fmt_param(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return "|".join(fmt_param(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _basename(uri: str | None) -> str:
    if not uri:
        return ""
    return storage.sanitize_uri(uri).rstrip("/").rsplit("/", 1)[-1]


def _script_json(data: Any) -> str:
    """JSON safe to embed in a ``<script type="application/json">`` element."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


# --------------------------------------------------------------------------- thumbnails


def thumbnail_bytes(data: bytes, max_side: int, name: str = "image", max_pixels: int = 200_000_000) -> bytes:
    """A JPEG thumbnail (long side at most ``max_side``, never enlarged) of any image Pillow reads."""
    from PIL import Image

    from nst_core.images import load_image

    image = load_image(data, name=name, max_pixels=max_pixels)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85, optimize=True)
    return buffer.getvalue()


class _Thumbs:
    """Makes the thumbnails a report needs, once each, into ``{dest}/thumbs/``."""

    def __init__(self, dest: str):
        self.dest = dest
        prefix = storage.join(dest, THUMBS_DIR) + "/"
        try:
            self.present = {u.rsplit("/", 1)[-1] for u in storage.list_prefix(prefix)}
        except storage.StorageError:
            self.present = set()

    def _write(self, name: str, source_uri: str, max_side: int, data: bytes | None = None) -> str | None:
        rel = f"{THUMBS_DIR}/{name}"
        if name in self.present:
            return rel
        try:
            raw = data if data is not None else storage.read_bytes(source_uri)
            thumb = thumbnail_bytes(raw, max_side, name=storage.sanitize_uri(source_uri))
            storage.write_bytes(storage.join(self.dest, THUMBS_DIR, name), thumb, "image/jpeg")
        except Exception:  # noqa: BLE001 - a missing or broken image gets a placeholder, never fails the report
            return None
        self.present.add(name)
        return rel

    def output(self, item_id: str, image_uri: str) -> str | None:
        return self._write(paths.output_thumb_name(item_id, OUTPUT_THUMB_PX), image_uri, OUTPUT_THUMB_PX)

    def input(self, sha256: str | None, uri: str | None) -> str | None:
        if not uri:
            return None
        if sha256:
            return self._write(paths.input_thumb_name(sha256, INPUT_THUMB_PX), uri, INPUT_THUMB_PX)
        try:  # a row without meta.json (failed): hash the file to name its thumbnail
            data = storage.read_bytes(uri)
        except Exception:  # noqa: BLE001
            return None
        digest = storage.sha256_bytes(data)
        return self._write(paths.input_thumb_name(digest, INPUT_THUMB_PX), uri, INPUT_THUMB_PX, data)


# --------------------------------------------------------------------------- loss curves


def read_loss_csv(data: bytes) -> list[dict[str, float]]:
    rows = []
    for record in csv.DictReader(io.StringIO(data.decode("utf-8", "replace"))):
        row = {}
        for key, value in record.items():
            number = finite_number(value)
            if key is not None and number is not None:
                row[key] = number
        if "iteration" in row:
            rows.append(row)
    return rows


def _tick(value: float) -> str:
    return f"{value:.3g}" if 0.01 <= value < 10_000 else f"{value:.1e}"


def loss_svg(history: list[dict[str, float]], width: int = 360, height: int = 104) -> str:
    """The loss terms on a log scale as a small inline SVG (numbers only: nothing to escape)."""
    if not history:
        return '<p class="nocurve">no loss curve</p>'
    left, right, top, bottom = 44, 6, 15, 16
    xs = [row["iteration"] for row in history]
    values = [row[t] for row in history for t in _CURVE_TERMS if row.get(t, 0) > 0]
    if not values:
        return '<p class="nocurve">loss is zero</p>'
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = min(xs), max(xs)
    span = (x1 - x0) or 1.0

    def px(x: float) -> float:
        return left + (x - x0) / span * (width - left - right)

    def py(v: float) -> float:
        return top + (hi - math.log10(v)) / (hi - lo) * (height - top - bottom)

    parts = [
        f'<svg class="curve" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="loss curve, log scale">',
        f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/>',
        f'<text class="tick" x="{left - 3}" y="{top + 4}" text-anchor="end">{_tick(10 ** hi)}</text>',
        f'<text class="tick" x="{left - 3}" y="{height - bottom}" text-anchor="end">{_tick(10 ** lo)}</text>',
        f'<text class="tick" x="{left}" y="{height - 4}">{x0:g}</text>',
        f'<text class="tick" x="{width - right}" y="{height - 4}" text-anchor="end">{x1:g} it</text>',
    ]
    label_x = width - right - 4
    for term in reversed(_CURVE_TERMS):
        if any(row.get(term, 0) > 0 for row in history):
            parts.append(f'<text class="key k-{term}" x="{label_x}" y="{top - 5}" text-anchor="end">{term}</text>')
            label_x -= 8 + 6 * len(term)
    for term in _CURVE_TERMS:
        points = [(px(row["iteration"]), py(row[term])) for row in history if row.get(term, 0) > 0]
        if len(points) == 1:
            cx, cy = points[0]
            parts.append(f'<circle class="l-{term}" cx="{cx:.1f}" cy="{cy:.1f}" r="2"/>')
        elif points:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline class="l-{term}" points="{coords}"/>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- gathering


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        value = json.loads(storage.read_bytes(uri))
    except (storage.StorageError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_history(uri: str) -> list[dict[str, float]]:
    try:
        return read_loss_csv(storage.read_bytes(uri))
    except (storage.StorageError, ValueError):
        return []


def _builtin_defaults() -> dict[str, Any]:
    try:
        from nst_core.params import StyleParams

        return StyleParams().model_dump(mode="json")
    except Exception:  # noqa: BLE001 - highlighting only
        return {}


def run_defaults(metas: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Each parameter's run default: its value in items whose row left it blank, else its most common value."""
    blank: dict[str, Counter[str]] = {}
    every: dict[str, Counter[str]] = {}
    for meta in metas:
        row = meta.get("row") or {}
        for name, value in (meta.get("params") or {}).items():
            if name in _IGNORED_PARAMS:
                continue
            key = _canon(value)
            every.setdefault(name, Counter())[key] += 1
            if name not in row:
                blank.setdefault(name, Counter())[key] += 1
    chosen = {}
    for name, counts in every.items():
        source = blank.get(name) or counts
        chosen[name] = json.loads(source.most_common(1)[0][0])
    return chosen


def _weights_note(weights: Counter[str]) -> str:
    random = sorted(w for w in weights if w.startswith("random:"))
    if not random:
        return ""
    return (
        f"UNTRAINED RANDOM WEIGHTS ({', '.join(random)}): these outputs come from a VGG-19 that was never trained. "
        "They show the pipeline working, not ImageNet-quality style transfer; do not publish them as such."
    )


# --------------------------------------------------------------------------- page


def build_report(run_uri: str, dest_uri: str | None = None, *, workers: int = 8, now: datetime | None = None) -> str:
    """Build ``report.html`` and its thumbnails for a stored run; returns the report's address.

    ``dest_uri`` is where the page and ``thumbs/`` go (default: the run folder
    itself). Nothing but stored metadata is read: results, summary, each item's
    ``meta.json``/``loss.csv``/output image, the input images (for thumbnails;
    an unreadable one gets a placeholder) and the decisions.
    """
    run = open_run(run_uri)
    dest = str(dest_uri).rstrip("/") or str(dest_uri) if dest_uri else run.folder
    decisions = load_decisions(run, workers=workers)
    items = sorted({str(r["item_id"]) for r in run.done_rows()})

    def meta_of(item: str) -> tuple[str, dict[str, Any] | None, list[dict[str, float]]]:
        folder = run.item_folder(item)
        if folder is None:
            return item, None, []
        return item, _read_json(storage.join(folder, paths.META_FILE)), _read_history(storage.join(folder, paths.LOSS_CSV))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        loaded = list(pool.map(meta_of, items))
    metas = {item: meta for item, meta, _ in loaded if meta is not None}
    curves = {item: history for item, _, history in loaded}

    thumbs = _Thumbs(dest)

    def thumbs_of(row: dict[str, Any]) -> dict[str, str | None]:
        item = str(row.get("item_id") or "")
        meta = metas.get(item)
        found: dict[str, str | None] = {"content": None, "style": None, "output": None}
        if meta:
            inputs = meta.get("inputs") or {}
            for role in ("content", "style"):
                info = inputs.get(role) or {}
                found[role] = thumbs.input(info.get("sha256"), info.get("uri"))
            folder = run.item_folder(item)
            image = (meta.get("outputs") or {}).get("image") or paths.image_name()
            if folder and "/" not in image and image not in (".", ".."):
                found["output"] = thumbs.output(item, storage.join(folder, image))
        elif row.get("status") != "invalid":
            for role in ("content", "style"):
                found[role] = thumbs.input(None, row.get(f"{role}_uri"))
        return found

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        row_thumbs = list(pool.map(thumbs_of, run.rows))

    page = render_page(run, metas, curves, row_thumbs, decisions, now=now or datetime.now(UTC))
    target = storage.join(dest, REPORT_FILE)
    storage.write_bytes(target, page.encode("utf-8"), "text/html; charset=utf-8")
    return target


def download_report(run_uri: str, local_dir: str | os.PathLike[str], *, workers: int = 8) -> Path:
    """Copy a stored report and its thumbnails into a local folder; returns the local ``report.html``.

    Thumbnails already there (same content-addressed name) are not fetched again.
    """
    folder = run_folder(run_uri)
    local = Path(local_dir).expanduser()
    (local / THUMBS_DIR).mkdir(parents=True, exist_ok=True)
    source_prefix = storage.join(folder, THUMBS_DIR) + "/"
    names = [u.rsplit("/", 1)[-1] for u in storage.list_prefix(source_prefix)]

    def copy(name: str) -> None:
        if "/" in name or name.startswith(".") or (local / THUMBS_DIR / name).is_file():
            return
        storage.write_bytes(str(local / THUMBS_DIR / name), storage.read_bytes(storage.join(folder, THUMBS_DIR, name)))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(copy, names))
    target = local / REPORT_FILE
    storage.write_bytes(str(target), storage.read_bytes(storage.join(folder, REPORT_FILE)))
    return target


def render_page(
    run: Run,
    metas: dict[str, dict[str, Any]],
    curves: dict[str, list[dict[str, float]]],
    row_thumbs: list[dict[str, str | None]],
    decisions: dict[str, list[Decision]],
    *,
    now: datetime,
) -> str:
    """The page (``templates/report.html.j2``) for a run read back, its items' metadata, curves, thumbnails and decisions."""
    summary = run.summary
    rows = run.rows
    defaults = run_defaults(metas.values())
    builtin = _builtin_defaults()
    # Parameters with more than one value in this run: shown on every card, filterable, sortable.
    values_of: dict[str, Counter[str]] = {}
    for stored in metas.values():
        for name, value in (stored.get("params") or {}).items():
            if name not in _IGNORED_PARAMS:
                values_of.setdefault(name, Counter())[_canon(value)] += 1
    varying = sorted(name for name, counts in values_of.items() if len(counts) > 1)

    counts = Counter(str(r.get("status")) for r in rows)
    computed = {}
    for r in rows:
        if r.get("status") == "succeeded" and r.get("item_id"):
            meta = metas.get(str(r["item_id"]))
            computed[str(r["item_id"])] = finite_number((meta or {}).get("wall_time_s")) or finite_number(r.get("duration_s")) or 0.0
    device_s = sum(computed.values())
    per_device_hour = len(computed) / (device_s / 3600) if device_s > 0 else None
    wall_s = finite_number(summary.get("wall_time_s"))
    done_rows = sum(counts.get(s, 0) for s in DONE_STATUSES)
    per_wall_hour = done_rows / (wall_s / 3600) if wall_s else None
    devices = Counter(str(m.get("device")) for m in metas.values() if m.get("device"))
    weights = Counter(str(r.get("weights_id")) for r in rows if r.get("weights_id"))
    judges = Counter(str((m.get("quality") or {}).get("judge_weights")) for m in metas.values() if (m.get("quality") or {}).get("judge_weights"))
    random_note = _weights_note(weights) or (
        "UNTRAINED RANDOM WEIGHTS (random:N) were used in this run: outputs are smoke-test quality." if summary.get("random_weights") else ""
    )
    verdict_of = {item: verdict(ds) for item, ds in decisions.items()}
    verdicts = Counter(verdict_of.get(str(r["item_id"]), "undecided") for r in {str(r["item_id"]): r for r in run.done_rows()}.values())

    style_labels: dict[str, str] = {}
    for r in rows:
        uri = storage.sanitize_uri(r.get("style_uri") or "")
        if uri:
            style_labels.setdefault(uri, _basename(uri))
    if len(set(style_labels.values())) < len(style_labels):
        style_labels = {uri: uri for uri in style_labels}

    records: list[dict[str, Any]] = []
    cards: list[dict[str, Any]] = []
    for index, (row, found) in enumerate(zip(rows, row_thumbs, strict=True)):
        item = str(row.get("item_id") or "")
        meta = metas.get(item) if row.get("status") in DONE_STATUSES else None
        params = (meta or {}).get("params") or {}
        status = str(row.get("status") or "")
        style_uri = storage.sanitize_uri(row.get("style_uri") or "")
        content_uri = storage.sanitize_uri(row.get("content_uri") or "")
        item_decisions = decisions.get(item, []) if meta else []
        row_verdict = verdict_of.get(item, "undecided") if meta else ""
        losses = (meta or {}).get("final_losses") or {}
        quality = (meta or {}).get("quality") or {}
        sd = finite_number(quality.get("style_distance", row.get("style_distance")))
        cd = finite_number(quality.get("content_distance", row.get("content_distance")))
        total = finite_number(losses.get("total", row.get("loss_total")))
        duration = finite_number((meta or {}).get("wall_time_s", row.get("duration_s")))
        meta_cells = {k: v for k, v in row.items() if k.startswith("meta_") and v not in (None, "")}
        diff = {n: v for n, v in params.items() if n not in _IGNORED_PARAMS and n in defaults and _canon(v) != _canon(defaults[n])}
        shown_params = {n: params[n] for n in varying if n in params}
        search = " ".join(
            str(x) for x in (row.get("id"), item, status, row.get("error"), _basename(content_uri), _basename(style_uri), *meta_cells.values()) if x
        ).lower()
        records.append({
            "i": index, "row": row.get("row"), "id": str(row.get("id") or ""), "status": status, "style": style_uri,
            "verdict": row_verdict, "item": item if meta else "", "loss": total, "sd": sd, "cd": cd, "dur": duration,
            "p": {n: _canon(v) for n, v in shown_params.items()},
            "pn": {n: v for n, v in shown_params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "q": search,
        })  # fmt: skip
        figures = [
            {"src": found.get("output"), "role": "output", "caption": f"{params.get('size', '')} px" if params else status, "title": item},
            {"src": found.get("content"), "role": "content", "caption": _basename(content_uri), "title": content_uri},
            {"src": found.get("style"), "role": "style", "caption": _basename(style_uri), "title": style_uri},
        ]
        chips = [
            {
                "name": name, "value": fmt_param(params.get(name)), "diff": name in diff,
                "tip": f"run default: {fmt_param(defaults.get(name))}" if name in diff else "as the run default",
            }
            for name in sorted(set(diff) | set(shown_params))
        ]  # fmt: skip
        cards.append({
            "index": index, "row": row.get("row"), "id": row.get("id"), "status": status, "item": item,
            "verdict": row_verdict if row_verdict != "undecided" else "",
            "figures": figures if status != "invalid" else [],
            "meta": bool(meta), "curve": Markup(loss_svg(curves.get(item, []))) if meta else "",
            "judge": quality.get("judge_weights"), "sd": fmt_num(sd, 3), "cd": fmt_num(cd, 3), "total": fmt_num(total, 4),
            "content": fmt_num(finite_number(losses.get("content")), 3), "style": fmt_num(finite_number(losses.get("style")), 3),
            "time": fmt_duration(duration), "chips": chips,
            "meta_cells": [(k.removeprefix("meta_"), v) for k, v in sorted(meta_cells.items())],
            "error": row.get("error"),
            "decisions": item_decisions, "latest": latest_per_reviewer(item_decisions),
            "iterations": (meta or {}).get("iterations"), "device": (meta or {}).get("device"),
        })  # fmt: skip

    def pairs(counter: Counter[str]) -> list[tuple[str, int]]:
        return counter.most_common()

    style_counts = Counter(r["style"] for r in records if r["style"])
    sorts = [("row", "row"), ("id", "id"), ("status", "status"), ("style", "style"), ("loss", "loss total"),
             ("sd", "style distance"), ("cd", "content distance"), ("dur", "time")]  # fmt: skip
    sorts += [(f"p:{name}", f"parameter {name}") for name in varying]
    return _template().render(
        csp=_CSP,
        style=Markup(_STYLE),
        script=Markup(_SCRIPT),
        run_name=run.name,
        run_uri=run.shown_uri,
        note=random_note,
        stats={
            "total": len(rows),
            "statuses": [(s, counts.get(s, 0)) for s in STATUSES if counts.get(s) or s in ALWAYS_SHOWN_STATUSES],
            "verdicts": [(v, verdicts.get(v, 0)) for v in VERDICTS],
        },
        facts={
            "device_time": fmt_duration(device_s), "computed": len(computed),
            "per_device_hour": _rate(per_device_hour), "per_wall_hour": _rate(per_wall_hour) if per_wall_hour else "",
            "wall_time": fmt_duration(wall_s), "devices": pairs(devices), "weights": pairs(weights), "judges": pairs(judges),
            "manifest": storage.sanitize_uri(str(summary.get("manifest_uri") or "—")), "run_folder": run.shown_uri,
        },  # fmt: skip
        run_params=[
            {
                "name": name, "value": fmt_param(defaults[name]),
                "changed": name in builtin and _canon(builtin[name]) != _canon(defaults[name]),
                "varies": ", ".join(fmt_param(json.loads(v)) for v in sorted(values_of[name])) if name in varying else "",
            }
            for name in sorted(defaults)
        ],  # fmt: skip
        controls={
            "statuses": [(s, counts.get(s, 0)) for s in STATUSES if counts.get(s)],
            "styles": [(uri, label, style_counts.get(uri, 0)) for uri, label in sorted(style_labels.items(), key=lambda kv: kv[1])],
            "params": [
                (_canon([name, v]), f"{name} = {fmt_param(json.loads(v))} ({n})") for name in varying for v, n in sorted(values_of[name].items())
            ],
            "verdicts": VERDICTS,
            "sorts": sorts,
        },
        cards=cards,
        data=Markup(_script_json({"run": run.name, "run_uri": run.shown_uri, "format": BULK_FORMAT, "records": records})),
        generated=now.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


# --------------------------------------------------------------------------- template and assets

# The page's style and script are inlined verbatim from static/ (their bytes, leading newline included,
# are what the CSP hashes): the page stays one self-contained file that opens from any copy of the run folder.
_STYLE = resources.files(__package__).joinpath("static", "report.css").read_text(encoding="utf-8")
_SCRIPT = resources.files(__package__).joinpath("static", "report.js").read_text(encoding="utf-8")
# Templates whose line breaks (and the indentation after them) are the file's layout only, not the page's.
_COMPACT_TEMPLATES = frozenset({"parts.html.j2"})
_LAYOUT_BREAK = re.compile(r"\n[ \t]*")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


_CSP = (
    "default-src 'none'; img-src 'self' data: blob:; "
    f"style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)}; "
    "base-uri 'none'; form-action 'none'"
)


class _Loader(jinja2.BaseLoader):
    """The package's templates/; a compact template loses its layout line breaks as it is loaded."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, None, Callable[[], bool]]:
        path = resources.files(__package__).joinpath("templates", template)
        if "/" in template or not path.is_file():
            raise jinja2.TemplateNotFound(template)
        source = path.read_text(encoding="utf-8")
        if template in _COMPACT_TEMPLATES:
            source = _LAYOUT_BREAK.sub("", source)
        return source, None, lambda: True


def _escaped(value: Any) -> Any:
    """Every value the template prints is HTML-escaped (text and attributes alike; None prints nothing).

    Markup (the trusted assets, the SVG curves, the macros' own output) passes as it is.
    """
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=_Loader(), autoescape=True, finalize=_escaped, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    return env.get_template("report.html.j2")
