"""The run report as a Prefect task, so its state, duration and retries show in the UI."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from nst_core import storage
from nst_core.report import build_report
from tasks.naming import report_run_name


@task(name="build-report", task_run_name=report_run_name, cache_policy=NO_CACHE)
def build_run_report(run_folder: str, patience_s: float) -> str:
    """Build ``{run_folder}/report.html`` (and its thumbnails) from what the run stored; returns its URI.

    Transient storage errors are retried for up to ``patience_s`` seconds here (the table is written,
    so the report is worth waiting for); the flow's own retry options (``with_options``) add task retries.

    Raises:
        StorageError: storage refused the report for good, or stayed unreachable past ``patience_s``.
    """
    return storage.retry_transient(lambda: build_report(run_folder), patience_s)
