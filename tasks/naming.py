"""Task run names that say what a run holds (the Prefect UI lists task runs by name).

``task_run_name`` callables of the tasks: Prefect calls each with the task's bound ``parameters``
when the run starts, so ``stylize rows 120-135: id-a, id-b, ...`` replaces ``stylize-items-3f2``.
Pure functions of the rows they are given; nothing here touches storage or the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

NAME_LIMIT = 120  # the UI cuts long names; the rows come first, ids fill what is left


def rows_label(rows: Iterable[int]) -> str:
    """``row 7``, ``rows 120-135`` (contiguous), ``rows 3, 7, 9`` or ``rows 3, 7, 9, ... (12)`` (a gap-y batch)."""
    numbers = sorted(set(rows))
    if not numbers:
        return "no rows"
    if len(numbers) == 1:
        return f"row {numbers[0]}"
    if numbers[-1] - numbers[0] + 1 == len(numbers):
        return f"rows {numbers[0]}-{numbers[-1]}"
    shown = ", ".join(str(n) for n in numbers[:4])
    return f"rows {shown}" if len(numbers) <= 4 else f"rows {shown}, ... ({len(numbers)})"


def _with_ids(head: str, ids: list[str]) -> str:
    text = f"{head}: {', '.join(ids)}" if ids else head
    return text if len(text) <= NAME_LIMIT else text[: NAME_LIMIT - 3] + "..."


def stylize_run_name(parameters: dict[str, Any]) -> str:
    """``stylize rows 120-135: tubingen-starry, ...``: the rows and ids of the batch's items."""
    works = parameters.get("works") or []
    return _with_ids(f"stylize {rows_label(w.row.row for w in works)}", [w.row.id for w in works])


def resolve_run_name(parameters: dict[str, Any]) -> str:
    """``resolve rows 1-64``: the chunk of manifest rows being hashed and checked."""
    return f"resolve {rows_label(r.row for r in parameters.get('rows') or [])}"


def manifest_run_name(parameters: dict[str, Any]) -> str:
    """``read manifest nightly.csv``: the manifest's file name (never its query string)."""
    uri = str(parameters.get("manifest_uri") or "")
    name = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or uri
    return f"read manifest {name}"


def report_run_name(parameters: dict[str, Any]) -> str:
    """``report 20260101T020000000000Z-amber-fox``: the run folder's last part."""
    return f"report {str(parameters.get('run_folder') or '').rstrip('/').rsplit('/', 1)[-1]}"
