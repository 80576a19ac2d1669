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
import hashlib
import html
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def e(value: Any) -> str:
    """HTML-escape anything (text and attribute values alike)."""
    return html.escape("" if value is None else str(value), quote=True)


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


def _decision_html(decisions: list[Decision]) -> str:
    if not decisions:
        return ""
    latest = latest_per_reviewer(decisions)
    parts = ['<div class="decisions"><ul>']
    for d in latest:
        note = f' <q>{e(d.note)}</q>' if d.note else ""
        parts.append(
            f'<li class="d-{e(d.decision)}"><b>{e(d.reviewer)}</b> '
            f'<span class="dec">{e(d.decision)}</span>{note} <time>{e(d.decided_at[:16].replace("T", " "))}</time></li>'
        )
    parts.append("</ul>")
    if len(decisions) > len(latest):
        parts.append(f"<details><summary>all {len(decisions)} decisions</summary><ol>")
        for d in decisions:
            note = f' <q>{e(d.note)}</q>' if d.note else ""
            parts.append(f"<li><b>{e(d.reviewer)}</b> {e(d.decision)}{note} <time>{e(d.decided_at[:19].replace('T', ' '))}</time></li>")
        parts.append("</ol></details>")
    parts.append("</div>")
    return "".join(parts)


def _figure(src: str | None, role: str, caption: str, title: str) -> str:
    if src:
        img = f'<img src="{e(src)}" alt="{e(role)}: {e(caption)}" loading="lazy" decoding="async">'
    else:
        img = f'<span class="noimg">no {e(role)} image</span>'
    return f'<figure class="f-{e(role)}">{img}<figcaption title="{e(title)}"><span class="role">{e(role)}</span> {e(caption)}</figcaption></figure>'


def render_page(
    run: Run,
    metas: dict[str, dict[str, Any]],
    curves: dict[str, list[dict[str, float]]],
    row_thumbs: list[dict[str, str | None]],
    decisions: dict[str, list[Decision]],
    *,
    now: datetime,
) -> str:
    summary = run.summary
    rows = run.rows
    defaults = run_defaults(metas.values())
    builtin = _builtin_defaults()
    # Parameters with more than one value in this run: shown on every card, filterable, sortable.
    values_of: dict[str, Counter[str]] = {}
    for meta in metas.values():
        for name, value in (meta.get("params") or {}).items():
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
    cards: list[str] = []
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

        head = (
            f'<header><span class="rowno">#{e(row.get("row"))}</span>'
            f'<h2 class="id" title="{e(row.get("id"))}">{e(row.get("id"))}</h2>'
            f'<span class="badge st-{e(status)}">{e(status)}</span>'
            + (f'<span class="badge v-{e(row_verdict)}">{e(row_verdict)}</span>' if row_verdict and row_verdict != "undecided" else "")
            + "</header>"
        )
        figures = (
            '<div class="imgs">'
            + _figure(found.get("output"), "output", f"{params.get('size', '')} px" if params else status, item)
            + _figure(found.get("content"), "content", _basename(content_uri), content_uri)
            + _figure(found.get("style"), "style", _basename(style_uri), style_uri)
            + "</div>"
        )
        body = [head, figures] if status != "invalid" else [head]
        if meta:
            body.append(loss_svg(curves.get(item, [])))
            body.append(
                '<dl class="metrics">'
                f'<div class="score"><dt title="style distance judged by {e(quality.get("judge_weights"))}; lower is better">style dist.</dt><dd>{fmt_num(sd, 3)}</dd></div>'
                f'<div class="score"><dt title="relu4_2 content distance judged by {e(quality.get("judge_weights"))}; lower is better">content dist.</dt><dd>{fmt_num(cd, 3)}</dd></div>'
                f'<div><dt>loss total</dt><dd>{fmt_num(total, 4)}</dd></div>'
                f'<div><dt>content</dt><dd>{fmt_num(finite_number(losses.get("content")), 3)}</dd></div>'
                f'<div><dt>style</dt><dd>{fmt_num(finite_number(losses.get("style")), 3)}</dd></div>'
                f'<div><dt>time</dt><dd>{e(fmt_duration(duration))}</dd></div>'
                "</dl>"
            )
            chips = []
            for name in sorted(set(diff) | set(shown_params)):
                value = params.get(name)
                cls = "chip diff" if name in diff else "chip"
                tip = f"run default: {fmt_param(defaults.get(name))}" if name in diff else "as the run default"
                chips.append(f'<span class="{cls}" title="{e(tip)}">{e(name)} = {e(fmt_param(value))}</span>')
            chips_html = "".join(chips) or '<span class="chip plain">run defaults</span>'
            body.append(f'<div class="params">{chips_html}</div>')
        if meta_cells:
            body.append(
                '<dl class="meta">'
                + "".join(f"<div><dt>{e(k.removeprefix('meta_'))}</dt><dd>{e(v)}</dd></div>" for k, v in sorted(meta_cells.items()))
                + "</dl>"
            )
        if row.get("error"):
            body.append(f'<p class="error">{e(row.get("error"))}</p>')
        if meta:
            body.append(_decision_html(item_decisions))
            body.append(
                '<footer>'
                f'<span class="item" title="item id {e(item)}">item {e(item[:12])}</span>'
                f'<span>{e(meta.get("iterations"))} it · {e(meta.get("device"))}</span>'
                f'<span class="mark"><button type="button" class="b-keep" data-act="keep" data-item="{e(item)}" data-id="{e(row.get("id"))}">keep</button>'
                f'<button type="button" class="b-reject" data-act="reject" data-item="{e(item)}" data-id="{e(row.get("id"))}">reject</button></span>'
                "</footer>"
            )
        cards.append(f'<article class="card st-{e(status)}" data-i="{index}" id="row-{e(row.get("row"))}">{"".join(body)}</article>')

    return _PAGE.format(
        title=e(f"Run report {run.name}"),
        csp=e(_CSP),
        style=_STYLE,
        script=_SCRIPT,
        heading=e(run.name),
        banner=_banner_html(random_note),
        stats=_stats_html(counts, verdicts, len(rows)),
        facts=_facts_html(run, summary, device_s, per_device_hour, wall_s, per_wall_hour, devices, weights, judges, len(computed)),
        params=_params_html(defaults, builtin, varying, values_of),
        controls=_controls_html(counts, style_labels, varying, values_of, records),
        cards="\n".join(cards),
        data=_script_json({"run": run.name, "run_uri": run.shown_uri, "format": BULK_FORMAT, "records": records}),
        generated=e(now.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        run_uri=e(run.shown_uri),
    )


def _banner_html(note: str) -> str:
    if not note:
        return ""
    head, sep, rest = note.partition("): ")
    if not sep:
        return f'<div class="banner" role="alert"><strong>⚠ {e(note)}</strong></div>'
    return f'<div class="banner" role="alert"><strong>⚠ {e(head)})</strong>: {e(rest)}</div>'


def _stats_html(counts: Counter[str], verdicts: Counter[str], total: int) -> str:
    tiles = [f'<div class="tile"><b>{total}</b><span>rows</span></div>']
    shown = [s for s in STATUSES if counts.get(s) or s in ALWAYS_SHOWN_STATUSES]
    tiles += [f'<div class="tile st-{s}"><b>{counts.get(s, 0)}</b><span>{s.replace("_", " ")}</span></div>' for s in shown]
    tiles += [f'<div class="tile v-{v}"><b>{verdicts.get(v, 0)}</b><span>{v}</span></div>' for v in VERDICTS]
    return "".join(tiles)


def _facts_html(run: Run, summary: dict[str, Any], device_s: float, per_device_hour: float | None, wall_s: float | None,
                per_wall_hour: float | None, devices: Counter[str], weights: Counter[str], judges: Counter[str], computed: int) -> str:  # fmt: skip
    def listing(counter: Counter[str]) -> str:
        return ", ".join(f"{e(k)} ({n})" if len(counter) > 1 else e(k) for k, n in counter.most_common()) or "—"

    facts = [
        ("device time", f"{e(fmt_duration(device_s))} for {computed} computed item{'s' if computed != 1 else ''}"),
        ("images / hour", f"{_rate(per_device_hour)} per device-hour" + (f" · {_rate(per_wall_hour)} rows per hour over the run's {e(fmt_duration(wall_s))} wall time" if per_wall_hour else "")),
        ("device", listing(devices)),
        ("weights", listing(weights)),
        ("score judged by", listing(judges) + " (other weights than optimised against; lower distance is better)"),
        ("manifest", f"<code>{e(storage.sanitize_uri(str(summary.get('manifest_uri') or '—')))}</code>"),
        ("run folder", f"<code>{e(run.shown_uri)}</code>"),
    ]
    return "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)


def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _params_html(defaults: dict[str, Any], builtin: dict[str, Any], varying: list[str], values_of: dict[str, Counter[str]]) -> str:
    if not defaults:
        return ""
    cells = []
    for name in sorted(defaults):
        value = defaults[name]
        changed = name in builtin and _canon(builtin[name]) != _canon(value)
        note = ""
        if name in varying:
            note = f' <em>varies: {e(", ".join(fmt_param(json.loads(v)) for v in sorted(values_of[name])))}</em>'
        cls = ' class="changed"' if changed else ""
        cells.append(f"<div{cls}><dt>{e(name)}</dt><dd>{e(fmt_param(value))}{note}</dd></div>")
    return f'<details class="runparams"><summary>Run parameters (bold: not the built-in default)</summary><dl>{"".join(cells)}</dl></details>'


def _controls_html(counts: Counter[str], styles: dict[str, str], varying: list[str], values_of: dict[str, Counter[str]], records: list[dict[str, Any]]) -> str:
    status_opts = "".join(f'<option value="{s}">{s} ({counts.get(s, 0)})</option>' for s in STATUSES if counts.get(s))
    style_counts = Counter(r["style"] for r in records if r["style"])
    style_opts = "".join(
        f'<option value="{e(uri)}">{e(label)} ({style_counts.get(uri, 0)})</option>' for uri, label in sorted(styles.items(), key=lambda kv: kv[1])
    )
    param_opts = "".join(
        f'<option value="{e(_canon([name, v]))}">{e(name)} = {e(fmt_param(json.loads(v)))} ({n})</option>'
        for name in varying
        for v, n in sorted(values_of[name].items())
    )
    verdict_opts = "".join(f'<option value="{v}">{v}</option>' for v in VERDICTS)
    sorts = [("row", "row"), ("id", "id"), ("status", "status"), ("style", "style"), ("loss", "loss total"),
             ("sd", "style distance"), ("cd", "content distance"), ("dur", "time")]  # fmt: skip
    sorts += [(f"p:{name}", f"parameter {name}") for name in varying]
    sort_opts = "".join(f'<option value="{e(k)}">{e(label)}</option>' for k, label in sorts)
    param_select = (
        f'<label>parameter <select id="f-param"><option value="">all</option>{param_opts}</select></label>' if param_opts else ""
    )
    return (
        '<div class="controls" role="search">'
        '<label class="grow">search <input type="search" id="f-q" placeholder="id, meta, error, file name"></label>'
        f'<label>status <select id="f-status"><option value="">all</option>{status_opts}</select></label>'
        f'<label>style <select id="f-style"><option value="">all</option>{style_opts}</select></label>'
        f"{param_select}"
        f'<label>decision <select id="f-verdict"><option value="">all</option>{verdict_opts}</select></label>'
        '<label>style dist. ≤ <input type="number" id="f-sd" step="any" min="0" inputmode="decimal"></label>'
        '<label>loss ≤ <input type="number" id="f-loss" step="any" min="0" inputmode="decimal"></label>'
        f'<label>sort <select id="sort">{sort_opts}</select></label>'
        '<button type="button" id="sort-dir" title="sort direction" aria-label="sort direction">▲</button>'
        '<span id="shown" aria-live="polite"></span>'
        "</div>"
    )


_STYLE = """
:root{--bg:#f4f5f7;--card:#fff;--ink:#1d2330;--mute:#5d6677;--line:#dfe3ea;--accent:#2456c7;
--ok:#1c7c3c;--cached:#3d6fb6;--fail:#b3261e;--inv:#8a5a00;--keep:#1c7c3c;--rej:#b3261e;--disp:#8a5a00}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);background:var(--bg)}
header.top{padding:18px 24px 8px}
header.top h1{margin:0;font-size:20px;font-weight:650}
header.top h1 small{color:var(--mute);font-weight:400;font-size:14px;margin-left:8px}
.banner{margin:10px 24px;padding:12px 16px;border:2px solid #c62828;background:#fdecea;color:#7f1d1d;border-radius:8px;font-size:15px}
.banner strong{font-size:16px;letter-spacing:.02em}
.summary{padding:0 24px 8px}
.stats{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
.tile{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:6px 12px;min-width:84px}
.tile b{display:block;font-size:20px;line-height:1.2}
.tile span{color:var(--mute);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.tile.st-succeeded b{color:var(--ok)}.tile.st-cached b,.tile.st-done_elsewhere b{color:var(--cached)}.tile.st-in_progress_elsewhere b{color:var(--inv)}.tile.st-failed b{color:var(--fail)}.tile.st-invalid b{color:var(--inv)}
.tile.v-kept b{color:var(--keep)}.tile.v-rejected b{color:var(--rej)}.tile.v-disputed b{color:var(--disp)}
dl{margin:0}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.facts div{display:contents}.facts dt{color:var(--mute)}.facts dd{margin:0;overflow-wrap:anywhere}
code{font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace}
.runparams{margin:8px 0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:6px 14px}
.runparams summary{cursor:pointer;color:var(--mute)}
.runparams dl{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:2px 16px;padding:6px 0}
.runparams dl div{display:flex;gap:8px}.runparams dt{color:var(--mute)}.runparams dd{margin:0;overflow-wrap:anywhere}
.runparams .changed dd{font-weight:700}.runparams em{color:var(--inv);font-style:normal}
.controls{position:sticky;top:0;z-index:5;display:flex;flex-wrap:wrap;align-items:end;gap:8px 12px;padding:10px 24px;background:rgba(244,245,247,.96);border-bottom:1px solid var(--line);backdrop-filter:blur(4px)}
.controls label{display:flex;flex-direction:column;font-size:12px;color:var(--mute);gap:2px}
.controls label.grow{flex:1 1 200px}
.controls input,.controls select,.controls button{font:inherit;font-size:13px;padding:4px 6px;border:1px solid #c5cbd6;border-radius:6px;background:#fff;color:var(--ink)}
.controls input[type=number]{width:90px}
.controls button{cursor:pointer;min-width:32px}
#shown{color:var(--mute);font-size:13px;padding-bottom:6px;margin-left:auto}
main.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:14px;padding:14px 24px 90px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 12px;display:flex;flex-direction:column;gap:8px;border-top:4px solid var(--ok)}
.card.st-cached,.card.st-done_elsewhere{border-top-color:var(--cached)}.card.st-in_progress_elsewhere{border-top-color:var(--inv)}.card.st-failed{border-top-color:var(--fail)}.card.st-invalid{border-top-color:var(--inv)}
.card[hidden]{display:none}
.card header{display:flex;align-items:center;gap:8px;min-width:0}
.card h2{margin:0;font-size:15px;font-weight:650;flex:1;min-width:0;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.rowno{color:var(--mute);font-size:12px}
.badge{font-size:11px;font-weight:600;padding:2px 8px;border-radius:99px;background:#e8f3ec;color:var(--ok);text-transform:uppercase;letter-spacing:.03em}
.badge.st-cached,.badge.st-done_elsewhere{background:#e7eef9;color:var(--cached)}.badge.st-in_progress_elsewhere{background:#fbf1dc;color:var(--inv)}.badge.st-failed{background:#fdecea;color:var(--fail)}.badge.st-invalid{background:#fbf1dc;color:var(--inv)}
.badge.v-kept{background:var(--keep);color:#fff}.badge.v-rejected{background:var(--rej);color:#fff}.badge.v-disputed{background:var(--disp);color:#fff}
.imgs{display:grid;grid-template-columns:2fr 1fr;grid-template-rows:1fr 1fr;gap:6px}
.imgs figure{margin:0;position:relative;background:#eceef2;border-radius:6px;overflow:hidden;aspect-ratio:1;display:flex;align-items:center;justify-content:center}
.imgs .f-output{grid-row:1 / span 2}
.imgs img{width:100%;height:100%;object-fit:contain;display:block}
.imgs figcaption{position:absolute;left:0;right:0;bottom:0;padding:2px 6px;font-size:11px;color:#fff;background:linear-gradient(transparent,rgba(0,0,0,.65));white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.imgs .role{font-weight:700;text-transform:uppercase;font-size:10px;letter-spacing:.05em;opacity:.85}
.noimg{color:var(--mute);font-size:12px}
svg.curve{width:100%;height:auto;background:#fafbfc;border:1px solid var(--line);border-radius:6px}
svg .axis{stroke:#b8bfcc;stroke-width:1}svg .tick{font-size:9px;fill:var(--mute)}
svg polyline{fill:none;stroke-width:1.6}
svg .key{font-size:9.5px;font-weight:600}svg .k-total{fill:#1d2330}svg .k-content{fill:#2456c7}svg .k-style{fill:#c2410c}svg .k-tv{fill:#7c3aed}
svg .l-total{stroke:#1d2330;fill:#1d2330}svg .l-content{stroke:#2456c7;fill:#2456c7}svg .l-style{stroke:#c2410c;fill:#c2410c}svg .l-tv{stroke:#7c3aed;fill:#7c3aed}
polyline.l-total,polyline.l-content,polyline.l-style,polyline.l-tv{fill:none}
.legend{font-size:11px;color:var(--mute);display:flex;gap:10px;margin-top:-4px}
.legend i{display:inline-block;width:10px;height:3px;vertical-align:middle;margin-right:3px}
.legend .k-total{background:#1d2330}.legend .k-content{background:#2456c7}.legend .k-style{background:#c2410c}.legend .k-tv{background:#7c3aed}
.nocurve{margin:0;color:var(--mute);font-size:12px}
.metrics{display:grid;grid-template-columns:repeat(3,1fr);gap:4px}
.metrics div{background:#f6f7f9;border-radius:6px;padding:3px 8px}
.metrics .score{background:#eef3fd}
.metrics dt{font-size:11px;color:var(--mute)}.metrics dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
.params{display:flex;flex-wrap:wrap;gap:4px}
.chip{font-size:12px;padding:1px 8px;border-radius:99px;border:1px solid var(--line);background:#f6f7f9;overflow-wrap:anywhere}
.chip.diff{border-color:#e0a100;background:#fff6dd;font-weight:600}.chip.plain{color:var(--mute)}
.meta{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:12px}
.meta div{display:flex;gap:4px;min-width:0}.meta dt{color:var(--mute)}.meta dt::after{content:":"}.meta dd{margin:0;overflow-wrap:anywhere}
.error{margin:0;padding:6px 8px;background:#fdecea;color:#7f1d1d;border-radius:6px;font-size:12.5px;overflow-wrap:anywhere}
.decisions ul,.decisions ol{margin:0;padding-left:18px;font-size:12.5px}
.decisions li.d-keep .dec{color:var(--keep);font-weight:700}.decisions li.d-reject .dec{color:var(--rej);font-weight:700}
.decisions time{color:var(--mute);font-size:11px}.decisions q{color:var(--mute)}
.decisions summary{cursor:pointer;color:var(--mute);font-size:12px}
.card footer{display:flex;align-items:center;gap:10px;margin-top:auto;font-size:12px;color:var(--mute)}
.card footer .mark{margin-left:auto;display:flex;gap:6px}
.card footer button{font:inherit;font-size:12px;padding:3px 12px;border-radius:6px;border:1px solid #c5cbd6;background:#fff;cursor:pointer;color:var(--ink)}
.card footer button.on.b-keep{background:var(--keep);border-color:var(--keep);color:#fff}
.card footer button.on.b-reject{background:var(--rej);border-color:var(--rej);color:#fff}
.card.marked-keep{box-shadow:0 0 0 2px var(--keep)}.card.marked-reject{box-shadow:0 0 0 2px var(--rej)}
#pending{position:fixed;left:0;right:0;bottom:0;z-index:6;display:flex;flex-wrap:wrap;align-items:center;gap:8px 12px;padding:10px 24px;background:#1d2330;color:#fff;font-size:13px}
#pending[hidden]{display:none}
#pending input{font:inherit;padding:3px 6px;border-radius:6px;border:0}
#pending button,#pending a{font:inherit;padding:4px 12px;border-radius:6px;border:0;background:#fff;color:#1d2330;cursor:pointer;text-decoration:none}
#pending code{background:rgba(255,255,255,.12);padding:2px 6px;border-radius:4px;overflow-wrap:anywhere}
footer.page{padding:0 24px 24px;color:var(--mute);font-size:12px}
.empty{grid-column:1/-1;color:var(--mute);padding:30px;text-align:center}
"""

_SCRIPT = r"""
(function(){
"use strict";
var D=JSON.parse(document.getElementById("nst-data").textContent);
var grid=document.getElementById("cards"),cards={};
Array.prototype.forEach.call(grid.querySelectorAll("article.card"),function(c){cards[c.getAttribute("data-i")]=c;});
function $(id){return document.getElementById(id);}
var dir=1,empty=document.createElement("p");empty.className="empty";empty.textContent="No row matches these filters.";
function num(v){var x=parseFloat(v);return isFinite(x)?x:null;}
function key(r,k){
  if(k.slice(0,2)==="p:"){var n=k.slice(2);return (r.pn&&n in r.pn)?r.pn[n]:(r.p&&r.p[n]!==undefined?r.p[n]:null);}
  return r[k]===undefined?null:r[k];
}
function cmp(a,b,k){
  var x=key(a,k),y=key(b,k);
  if(x===null||x==="")return (y===null||y==="")?a.i-b.i:1;
  if(y===null||y==="")return -1;
  var c=(typeof x==="number"&&typeof y==="number")?x-y:String(x).localeCompare(String(y),undefined,{numeric:true});
  return c===0?a.i-b.i:c*dir;
}
function apply(){
  var q=$("f-q").value.trim().toLowerCase(),st=$("f-status").value,sy=$("f-style").value,
      pv=$("f-param")?$("f-param").value:"",ve=$("f-verdict").value,msd=num($("f-sd").value),ml=num($("f-loss").value),
      k=$("sort").value,pf=pv?JSON.parse(pv):null,shown=0;
  var order=D.records.slice().sort(function(a,b){return cmp(a,b,k);});
  order.forEach(function(r){
    var ok=(!q||r.q.indexOf(q)>=0)&&(!st||r.status===st)&&(!sy||r.style===sy)&&(!ve||r.verdict===ve)&&
      (!pf||(r.p&&r.p[pf[0]]===pf[1]))&&(msd===null||(r.sd!==null&&r.sd<=msd))&&(ml===null||(r.loss!==null&&r.loss<=ml));
    var c=cards[r.i];c.hidden=!ok;if(ok)shown++;grid.appendChild(c);
  });
  if(!shown)grid.appendChild(empty);else if(empty.parentNode)empty.parentNode.removeChild(empty);
  $("shown").textContent=shown+" of "+D.records.length+" rows shown";
}
["f-q","f-status","f-style","f-param","f-verdict","f-sd","f-loss","sort"].forEach(function(id){
  var el=$(id);if(el){el.addEventListener("input",apply);el.addEventListener("change",apply);}
});
$("sort-dir").addEventListener("click",function(){dir=-dir;this.textContent=dir>0?"\u25B2":"\u25BC";apply();});
/* Marks made on this page, kept in this browser, saved as a file for `nst review RUN --from-file FILE`. */
var store={},skey="nst-review:"+D.run;
try{store=JSON.parse(window.localStorage.getItem(skey)||"{}")||{};}catch(err){store={};}
function save(){try{window.localStorage.setItem(skey,JSON.stringify(store));}catch(err){}}
function paint(){
  Array.prototype.forEach.call(grid.querySelectorAll("footer .mark button"),function(b){
    var m=store[b.getAttribute("data-item")],on=!!m&&m.decision===b.getAttribute("data-act");
    b.classList.toggle("on",on);b.setAttribute("aria-pressed",on?"true":"false");
  });
  Object.keys(cards).forEach(function(i){
    var c=cards[i],b=c.querySelector("footer .mark button"),m=b&&store[b.getAttribute("data-item")];
    c.classList.toggle("marked-keep",!!m&&m.decision==="keep");c.classList.toggle("marked-reject",!!m&&m.decision==="reject");
  });
  var n=Object.keys(store).length;$("pending").hidden=n===0;$("pending-n").textContent=n+(n===1?" decision":" decisions");
}
grid.addEventListener("click",function(ev){
  var b=ev.target.closest?ev.target.closest("button[data-act]"):null;if(!b)return;
  var item=b.getAttribute("data-item"),act=b.getAttribute("data-act");
  if(store[item]&&store[item].decision===act)delete store[item];else store[item]={item_id:item,id:b.getAttribute("data-id"),decision:act};
  save();paint();
});
try{$("reviewer").value=window.localStorage.getItem("nst-reviewer")||"";}catch(err){}
function payload(){
  var who=$("reviewer").value.trim();try{window.localStorage.setItem("nst-reviewer",who);}catch(err){}
  return {format:D.format,run:D.run,run_uri:D.run_uri,reviewer:who,decisions:Object.keys(store).map(function(k){return store[k];})};
}
$("save").addEventListener("click",function(){
  var p=payload();if(!p.reviewer){$("reviewer").focus();return;}
  var blob=new Blob([JSON.stringify(p,null,2)],{type:"application/json"}),a=document.createElement("a");
  a.href=URL.createObjectURL(blob);a.download="decisions-"+D.run+".json";document.body.appendChild(a);a.click();
  setTimeout(function(){URL.revokeObjectURL(a.href);a.remove();},1000);
});
$("clear").addEventListener("click",function(){store={};save();paint();});
apply();paint();
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


_CSP = (
    "default-src 'none'; img-src 'self' data: blob:; "
    f"style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)}; "
    "base-uri 'none'; form-action 'none'"
)

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header class="top"><h1>Run report <small>{heading}</small></h1></header>
{banner}
<section class="summary">
<div class="stats">{stats}</div>
<dl class="facts">{facts}</dl>
{params}
</section>
{controls}
<main class="grid" id="cards">
{cards}
</main>
<div id="pending" hidden>
<span><b id="pending-n"></b> marked on this page (kept in this browser)</span>
<label>reviewer <input id="reviewer" autocomplete="name" placeholder="your name"></label>
<button type="button" id="save">Save decisions file</button>
<button type="button" id="clear">Clear marks</button>
<span>then: <code>nst review {run_uri} --from-file decisions-{heading}.json</code></span>
</div>
<footer class="page">Built {generated} from the run's stored metadata by <code>nst report</code>.
Loss curves: weighted total and unweighted terms per iteration, log scale.
Scores are distances judged by a VGG-19 with other weights than the one optimised against: lower is better.</footer>
<script type="application/json" id="nst-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
