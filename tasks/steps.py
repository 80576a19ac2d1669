"""The flow's steps as Prefect tasks: each a few lines over a plain function of :mod:`nst_run`.

* :func:`read_manifest`: :func:`nst_run.manifest.load_manifest`.
* :func:`resolve_items`: :func:`nst_run.planning.resolve_items` (``item_id`` per row, ``cached`` ones found).
* :func:`stylize_items`: :func:`nst_run.execute.stylize_items` (lease, fetch, compute, store a unit of
  items), holding the global concurrency limit ``gpu`` (when the server has one) around each
  optimisation only.
* :func:`build_run_report`: :func:`nst_run.report.build_report`, so the report's state, duration and
  retries show in the UI.

The tasks add what Prefect gives: retries of transient storage errors only (:func:`transient_only`),
no result caching, the run logger. Callers that run no flow (``nst validate``, tests) call the plain
functions.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from nst_core import storage
from nst_core.params import StyleParams
from nst_run import execute, planning
from nst_run.lease import DEFAULT_TTL_S
from nst_run.manifest import Manifest, RowSpec, load_manifest
from nst_run.planning import Outcome, Work
from nst_run.report import build_report
from tasks.naming import manifest_run_name, report_run_name, resolve_run_name, stylize_run_name

# NAMED: Prefect's TaskRunNameCallbackWithParameters protocol carries a classmethod no function has, so
# mypy refuses any plain ``task_run_name`` callable that takes ``parameters`` (Prefect accepts it at run time).


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only storage errors that may go away."""
    try:
        state.result()
    except storage.StorageError as exc:
        return exc.transient
    except Exception:
        return False
    return False


@task(name="read-manifest", task_run_name=manifest_run_name, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)  # type: ignore[arg-type]  # see NAMED above
def read_manifest(manifest_uri: str, defaults: StyleParams, allow_local_paths: bool, max_items: int | None) -> Manifest:
    return load_manifest(manifest_uri, defaults=defaults, allow_local_paths=allow_local_paths, max_items=max_items)


@task(name="resolve-items", task_run_name=resolve_run_name, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)  # type: ignore[arg-type]  # see NAMED above
def resolve_items(rows: list[RowSpec], output_uri: str, force: bool, workers: int = 8, owner: str = "") -> list[Work | Outcome]:
    return planning.resolve_items(rows, output_uri, force, workers, owner)


@task(name="stylize-items", task_run_name=stylize_run_name, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)  # type: ignore[arg-type]  # see NAMED above
def stylize_items(
    works: list[Work],
    output_uri: str,
    time_limit_s: float | None = None,
    owner: str | None = None,
    lease_ttl_s: float = DEFAULT_TTL_S,
    lease_wait_s: float = 600.0,
    force: bool = False,
    batch_size: int = 0,
    store_retry_delays: list[float] | None = None,
    device_limit: str | None = None,
) -> list[Outcome]:
    """Compute ``works`` where this task runs; ``device_limit``: a Prefect global concurrency limit held
    around each optimisation only (not around fetches, uploads or lease waits)."""
    options = execute.RunOptions(batch_size, tuple(store_retry_delays or ()), _slot(device_limit))
    return execute.stylize_items(works, output_uri, time_limit_s, owner, lease_ttl_s, lease_wait_s, force, logger=get_run_logger(), options=options)


def _slot(limit: str | None) -> execute.DeviceSlot:
    if not limit:
        return contextlib.nullcontext
    return lambda: concurrency(limit, occupy=1, strict=True)


def device_limit_exists(name: str) -> bool:
    """Whether the Prefect server has a global concurrency limit ``name`` (created by
    ``prefect gcl create NAME --limit N``)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


@task(name="build-report", task_run_name=report_run_name, cache_policy=NO_CACHE)  # type: ignore[arg-type]  # see NAMED above
def build_run_report(run_folder: str, patience_s: float) -> str:
    """Build ``{run_folder}/report.html`` (and its thumbnails) from what the run stored; returns its URI.

    Transient storage errors are retried for up to ``patience_s`` seconds here (the table is written,
    so the report is worth waiting for); the flow's own retry options (``with_options``) add task retries.

    Raises:
        StorageError: storage refused the report for good, or stayed unreachable past ``patience_s``.
    """
    return storage.retry_transient(lambda: build_report(run_folder), patience_s)
