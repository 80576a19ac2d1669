"""Custom Prefect events of each run of ``stylize_manifest``, for automations and the event feed.

``nst.run.started``  once the manifest is read: ``payload`` {rows, invalid, manifest_uri, output_uri}.
``nst.run.finished`` when the results table is stored: ``payload`` {counts, rows, wall_time_s, results_csv,
                     report}; resource labels ``nst.outcome`` (``succeeded`` / ``failed``) and ``nst.failed``
                     (the count, as text), so an automation can match finished runs with failures:
                     ``{"expect": ["nst.run.finished"], "match": {"nst.outcome": "failed"}}``.

The resource is the nst run (``nst.run.<flow run id>``, named by its run folder's name); Prefect's
events worker adds the flow run, flow, deployment and tags as related resources. URIs pass
through ``storage.sanitize_uri``; no event carries a secret.
"""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event

from nst_core import storage

STARTED, FINISHED = "nst.run.started", "nst.run.finished"


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
