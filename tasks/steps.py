"""The flow's steps as Prefect tasks: each a few lines over a plain function of :mod:`nst_run`.

* :func:`read_manifest`: :func:`nst_run.manifest.load_manifest`.
* :func:`resolve_items`: :func:`nst_run.planning.resolve_items` (``item_id`` per row, ``cached`` ones found).
* :func:`stylize_items` (tag ``gpu``): :func:`nst_run.execute.stylize_items` (lease, compute, store a batch).

The tasks add what Prefect gives: retries of transient storage errors only (:func:`transient_only`),
no result caching, the run logger. Callers that run no flow (``nst validate``, tests) call the plain
functions.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from nst_core import storage
from nst_core.params import StyleParams
from nst_run import execute, planning
from nst_run.lease import DEFAULT_TTL_S
from nst_run.manifest import Manifest, RowSpec, load_manifest
from nst_run.planning import Outcome, Work


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only storage errors that may go away."""
    try:
        state.result()
    except storage.StorageError as exc:
        return exc.transient
    except Exception:
        return False
    return False


@task(name="read-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)
def read_manifest(manifest_uri: str, defaults: StyleParams, allow_local_paths: bool, max_items: int | None) -> Manifest:
    return load_manifest(manifest_uri, defaults=defaults, allow_local_paths=allow_local_paths, max_items=max_items)


@task(name="resolve-items", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)
def resolve_items(rows: list[RowSpec], output_uri: str, force: bool, workers: int = 8) -> list[Work | Outcome]:
    return planning.resolve_items(rows, output_uri, force, workers)


@task(name="stylize-items", tags=["gpu"], cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def stylize_items(
    works: list[Work],
    output_uri: str,
    time_limit_s: float | None = None,
    owner: str | None = None,
    lease_ttl_s: float = DEFAULT_TTL_S,
    lease_wait_s: float = 600.0,
    force: bool = False,
) -> list[Outcome]:
    return execute.stylize_items(works, output_uri, time_limit_s, owner, lease_ttl_s, lease_wait_s, force, logger=get_run_logger())
