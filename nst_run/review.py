"""Review decisions recorded on stored runs (runs are read back by :func:`nst_run.results.open_run`).

Decisions
    A reviewer's decision (``keep`` or ``reject``, optional note) about one
    item of a run is stored as its own small JSON object::

        {run}/decisions/{item_id}/{UTC timestamp}-{reviewer slug}.json

    written with :func:`nst_core.storage.write_bytes_if_absent`, so a decision
    is never overwritten: two reviewers deciding at the same moment write two
    objects, and a reviewer who changes their mind adds a newer one. Decisions
    are about the *item* (the stylised image, ``item_id``): manifest rows that
    share an item share its decisions.

    What counts is the latest decision of each reviewer
    (:func:`latest_per_reviewer`); an item's :func:`verdict` is ``kept`` when
    every reviewer's latest says keep, ``rejected`` when every one says reject,
    ``disputed`` when they disagree and ``undecided`` without decisions.

No Prefect here; storage through :mod:`nst_core.storage` only, and every URI
that is stored or shown goes through :func:`nst_core.storage.sanitize_uri`.
"""

from __future__ import annotations

import json
import re
import secrets
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nst_core import storage
from nst_run import paths
from nst_run.results import ReviewError, Run, open_run
from nst_run.status import DONE_STATUSES  # rows whose item has an output image

DECISIONS = ("keep", "reject")
VERDICTS = ("kept", "rejected", "disputed", "undecided")
DECISION_FORMAT = "nst-decision/1"
BULK_FORMAT = "nst-review-decisions/1"
MAX_REVIEWER_LENGTH = 100
MAX_NOTE_LENGTH = 2000



# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    item_id: str
    decision: str  # keep | reject
    reviewer: str
    decided_at: str  # ISO 8601, UTC
    note: str = ""
    run: str = ""
    ids: tuple[str, ...] = ()  # manifest ids of the rows that share the item
    uri: str = ""  # where it is stored

    def as_json(self) -> dict[str, Any]:
        return {
            "format": DECISION_FORMAT,
            "run": self.run,
            "item_id": self.item_id,
            "ids": list(self.ids),
            "decision": self.decision,
            "reviewer": self.reviewer,
            "note": self.note,
            "decided_at": self.decided_at,
        }

    @property
    def reviewer_key(self) -> str:
        return " ".join(self.reviewer.split()).casefold()


def reviewer_slug(reviewer: str) -> str:
    """A reviewer name as a safe file-name part (``[a-z0-9._-]``, at most 40 characters)."""
    text = unicodedata.normalize("NFKD", reviewer).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", text).strip("-._")[:40].strip("-._")
    return slug or "reviewer"


def check_reviewer(reviewer: str) -> str:
    name = " ".join(str(reviewer or "").split())
    if not name:
        raise ReviewError("--reviewer: a reviewer name is required")
    if len(name) > MAX_REVIEWER_LENGTH or any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ReviewError(f"--reviewer: at most {MAX_REVIEWER_LENGTH} printable characters")
    return name


def check_note(note: str | None) -> str:
    """A note as stored: text, stripped, bounded; a number, list or object is refused (ReviewError)."""
    if note is not None and not isinstance(note, str):
        raise ReviewError(f"--note: must be text, not {_json_kind(note)}")
    text = (note or "").strip()
    if len(text) > MAX_NOTE_LENGTH:
        raise ReviewError(f"--note: at most {MAX_NOTE_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in text):
        raise ReviewError("--note: control characters are not allowed")
    return text


def _json_kind(value: Any) -> str:
    """How a JSON value is named in a refusal: 'a number', 'a list', ..."""
    kinds = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), type(value).__name__)


def check_decision(decision: str) -> str:
    value = str(decision or "").strip().lower()
    if value not in DECISIONS:
        raise ReviewError(f"--decision: {decision!r} is not one of {', '.join(DECISIONS)}")
    return value


def resolve_target(run: Run, target: str) -> tuple[str, tuple[str, ...]]:
    """A manifest id, or an item id (or a unique prefix of one, 6+ hex digits) -> (item_id, ids of its rows).

    Manifest ids are matched first. The row must have an output image.
    """
    wanted = str(target).strip()
    rows = [r for r in run.rows if r.get("id") == wanted]
    if not rows and paths.ITEM_ID.match(wanted.lower()):
        matches = {r["item_id"] for r in run.rows if r.get("item_id") and str(r["item_id"]).startswith(wanted.lower())}
        if len(matches) > 1:
            raise ReviewError(f"item id prefix {wanted!r} matches {len(matches)} items of run {run.name}; give more digits")
        if matches:
            item = matches.pop()
            rows = [r for r in run.rows if r.get("item_id") == item]
    if not rows:
        raise ReviewError(f"run {run.name} has no row with id or item id {wanted!r}")
    row = rows[0]
    if row.get("status") not in DONE_STATUSES or not row.get("item_id"):
        raise ReviewError(f"row {row.get('row')} ({wanted!r}) is {row.get('status')}: it has no output image to review")
    item = str(row["item_id"])
    ids = tuple(str(r["id"]) for r in run.rows if r.get("item_id") == item and r.get("status") in DONE_STATUSES)
    return item, ids


def _stamp(now: datetime) -> tuple[str, str]:
    now = now.astimezone(UTC)
    return now.strftime("%Y%m%dT%H%M%S%fZ"), now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def decisions_prefix(run: Run) -> str:
    return paths.decisions_prefix(run.folder)


def record_decision(
    run: Run | str,
    target: str,
    decision: str,
    reviewer: str,
    note: str | None = None,
    *,
    now: datetime | None = None,
) -> Decision:
    """Store one decision as a new object; never overwrites one already stored."""
    run = open_run(run) if isinstance(run, str) else run
    decision = check_decision(decision)
    reviewer = check_reviewer(reviewer)
    note = check_note(note)
    item, ids = resolve_target(run, target)
    stamp, iso = _stamp(now or datetime.now(UTC))
    record = Decision(item_id=item, decision=decision, reviewer=reviewer, decided_at=iso, note=note, run=run.name, ids=ids)
    body = json.dumps(record.as_json(), indent=2, ensure_ascii=False).encode("utf-8")
    base = f"{stamp}-{reviewer_slug(reviewer)}"
    for attempt in range(8):
        name = base if attempt == 0 else f"{base}-{secrets.token_hex(4)}"
        uri = paths.decision_file(run.folder, item, name)
        if storage.write_bytes_if_absent(uri, body, "application/json"):
            return Decision(**{**record.__dict__, "uri": storage.sanitize_uri(uri)})
    raise ReviewError(f"could not store a decision for {item} in {run.shown_uri}: names kept colliding")  # pragma: no cover


def record_bulk(run: Run | str, payload: dict[str, Any], reviewer: str | None = None, *, now: datetime | None = None) -> list[Decision]:
    """Store the decisions of a file saved from the report page (``nst-review-decisions/1``).

    Every entry is checked before anything is stored, so a bad file stores nothing.
    """
    run = open_run(run) if isinstance(run, str) else run
    if not isinstance(payload, dict) or payload.get("format") != BULK_FORMAT or not isinstance(payload.get("decisions"), list):
        raise ReviewError(f"not a decisions file saved from a run report (format {BULK_FORMAT})")
    if payload.get("run") and payload["run"] != run.name:
        raise ReviewError(f"the decisions file is for run {payload['run']!r}, not {run.name!r}")
    who = check_reviewer(reviewer or payload.get("reviewer") or "")
    checked = []
    for number, entry in enumerate(payload["decisions"], start=1):
        if not isinstance(entry, dict):
            raise ReviewError("decisions file: every entry must be an object")
        for field_name in ("item_id", "id", "decision", "note"):
            if entry.get(field_name) is not None and not isinstance(entry[field_name], str):
                raise ReviewError(f"decisions file, entry {number}: {field_name} must be text, not {_json_kind(entry[field_name])}")
        target = str(entry.get("item_id") or entry.get("id") or "")
        resolve_target(run, target)
        checked.append((target, check_decision(entry.get("decision", "")), check_note(entry.get("note"))))
    return [record_decision(run, target, decision, who, note, now=now) for target, decision, note in checked]


def _parse_decision(uri: str, data: bytes) -> Decision | None:
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("decision") not in DECISIONS:
            return None
        item = str(obj.get("item_id") or "")
        if not paths.ITEM_ID.match(item):
            return None
        ids = obj["ids"] if isinstance(obj.get("ids"), list) else []
        return Decision(
            item_id=item,
            decision=obj["decision"],
            reviewer=str(obj.get("reviewer") or "?")[:MAX_REVIEWER_LENGTH],
            decided_at=str(obj.get("decided_at") or ""),
            note=str(obj.get("note") or "")[:MAX_NOTE_LENGTH],
            run=str(obj.get("run") or ""),
            ids=tuple(str(i) for i in ids),
            uri=storage.sanitize_uri(uri),
        )
    except (ValueError, TypeError):
        return None


def load_decisions(run: Run | str, workers: int = 16) -> dict[str, list[Decision]]:
    """Every decision stored with the run, by item id, oldest first. Unreadable objects are skipped."""
    run = open_run(run) if isinstance(run, str) else run
    uris = [u for u in storage.list_prefix(decisions_prefix(run) + "/") if u.endswith(".json")]

    def load(uri: str) -> Decision | None:
        try:
            return _parse_decision(uri, storage.read_bytes(uri))
        except storage.ObjectNotFound:
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(uris) or 1))) as pool:
        found = [d for d in pool.map(load, uris) if d is not None]
    by_item: dict[str, list[Decision]] = {}
    for d in sorted(found, key=lambda d: (d.decided_at, d.uri)):
        by_item.setdefault(d.item_id, []).append(d)
    return by_item


def latest_per_reviewer(decisions: Iterable[Decision]) -> list[Decision]:
    """The latest decision of each reviewer, in the order the reviewers last decided."""
    latest: dict[str, Decision] = {}
    for d in sorted(decisions, key=lambda d: (d.decided_at, d.uri)):
        latest.pop(d.reviewer_key, None)
        latest[d.reviewer_key] = d
    return list(latest.values())


def verdict(decisions: Sequence[Decision]) -> str:
    """``kept``, ``rejected``, ``disputed`` or ``undecided`` from the latest decision of each reviewer."""
    latest = {d.decision for d in latest_per_reviewer(decisions)}
    if not latest:
        return "undecided"
    if latest == {"keep"}:
        return "kept"
    if latest == {"reject"}:
        return "rejected"
    return "disputed"
