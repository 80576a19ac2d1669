"""Custom Prefect events of each run of ``stylize_manifest``, for automations and the event feed.

``nst.run.started``  once the manifest is read: ``payload`` {rows, invalid, manifest_uri, output_uri}.
``nst.run.finished`` when the results table is stored: ``payload`` {counts, rows, wall_time_s, results_csv,
                     report}; resource labels ``nst.outcome`` (``succeeded`` / ``failed``) and ``nst.failed``
                     (the count, as text), so an automation can match finished runs with failures:
                     ``{"expect": ["nst.run.finished"], "match": {"nst.outcome": "failed"}}``.

The resource is the nst run (``nst.run.<flow run id>``, named by its run folder's name); Prefect's
events worker adds the flow run, flow, deployment and tags as related resources. URIs pass
through ``storage.sanitize_uri``; no event carries a secret.

:func:`wait_for_delivery` keeps the flow from outrunning Prefect's events worker: every event a
task run emits (three state changes at least) waits in that worker's queue with a copy of the
context it was emitted in (``EventsWorker._context_cache``, Prefect 3.8), which holds the task run's
``TaskRunContext`` and everything it reaches (``TaskRun``, parameters, result, transaction, asset
context): about 25 kB per task run until the event is sent. The worker is one thread among the
flow's task threads; where they keep the interpreter busy it falls behind, and the queue (with its
contexts) grows for as long as the run lasts (``benchmarks/prefect_task_growth.py``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from prefect.events import emit_event
from prefect.events.worker import EventsWorker, should_emit_events

from nst_core import storage

STARTED, FINISHED = "nst.run.started", "nst.run.finished"

DELIVERY_WAIT_S = 60.0  # the longest a chunk waits for Prefect's events worker to catch up
log = logging.getLogger(__name__)
_waiter = ThreadPoolExecutor(1, thread_name_prefix="nst-events-delivery")
_waiting: list[Future[None]] = []  # the one wait in progress (a timed-out wait is waited on again, not doubled)
_lock = threading.Lock()


def _resource(run: str, flow_run_id: str, **labels: str) -> dict[str, str]:
    return {"prefect.resource.id": f"nst.run.{flow_run_id}", "prefect.resource.name": run, **labels}


def run_started(run: str, flow_run_id: str, *, rows: int, invalid: int, manifest_uri: str, output_uri: str) -> None:
    """Emit ``nst.run.started``."""
    emit_event(STARTED, resource=_resource(run, flow_run_id), payload={
        "rows": rows, "invalid": invalid,
        "manifest_uri": storage.sanitize_uri(manifest_uri), "output_uri": storage.sanitize_uri(output_uri),
    })  # fmt: skip


def run_finished(run: str, flow_run_id: str, summary: dict[str, Any]) -> None:
    """Emit ``nst.run.finished`` with the counts of ``summary`` (the run's summary.json)."""
    counts = summary["counts"]
    outcome = "failed" if counts.get("failed") else "succeeded"
    emit_event(FINISHED, resource=_resource(run, flow_run_id, **{"nst.outcome": outcome, "nst.failed": str(counts.get("failed", 0))}),
               payload={"counts": counts, "rows": summary["rows"], "wall_time_s": round(summary["wall_time_s"], 3),
                        "results_csv": summary.get("results_csv"), "report": summary.get("report")})  # fmt: skip


def wait_for_delivery(timeout_s: float) -> bool:
    """Wait until Prefect's events worker has sent every event this process queued, at most ``timeout_s``.

    The flow calls this before it takes in each chunk of rows, so the events (and the task-run contexts
    they hold) queued at any time are at most those of the few chunks in flight, however long the run.
    Where the worker keeps up (the usual case) the queue is empty or nearly so and this returns at
    once; where it does not, the flow waits for it instead of piling up memory. Uses only the worker's
    public ``instance()`` and ``wait_until_empty()``; the wait runs on a helper thread so a worker that
    cannot deliver (server unreachable) delays a chunk by ``timeout_s``, never stops the run.

    Args:
        timeout_s: the longest wait; on timeout the run goes on (and the next call waits again).

    Returns:
        True when the queue was emptied in time (or events are off), False on timeout.
    """
    if not should_emit_events():
        return True
    with _lock:
        if not _waiting or _waiting[0].done():
            _waiting[:] = [_waiter.submit(EventsWorker.instance().wait_until_empty)]
        waiting = _waiting[0]
    try:
        waiting.result(timeout=timeout_s)
    except FutureTimeout:
        log.warning("Prefect's events worker has not caught up within %.0f s; going on", timeout_s)
        return False
    return True
