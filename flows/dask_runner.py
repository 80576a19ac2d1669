"""prefect-dask's task runner, each task run submitted to dask as impure.

Dask names a submitted call by a hash of the function and every argument when the call is *pure*
(its default), so that two identical calls share one result. A Prefect task run is never identical
to another (each carries its own task-run id), so the hash can only ever be new, and computing it
is most of what a submission costs: dask cloudpickles the call's wrapper, the task, its parameters
and the serialised Prefect context to tokenise them, and then pickles them again to send them. In
``benchmarks/fleet.py`` (16 workers, 2 cores) that hashing was 0.12 s of the flow's 0.5 s per task
run. Submitted as impure, dask names the call with a fresh uuid instead; nothing else changes.

Only imported with the ``dask`` extra installed (``flows.stylize_manifest.on_dask``).
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Any

from prefect.client.schemas.objects import RunInput
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture


class ImpureDaskTaskRunner(DaskTaskRunner):
    """:class:`prefect_dask.DaskTaskRunner` whose submissions skip dask's argument hashing (``pure=False``)."""

    def submit(  # type: ignore[override]  # prefect-dask's overloads, one body
        self,
        task: Any,
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectDaskFuture[Any]] | None = None,
        dependencies: dict[str, Set[RunInput]] | None = None,
    ) -> PrefectDaskFuture[Any]:
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        future = self.client.submit(
            task,
            parameters=self._optimize_futures(parameters),
            wait_for=self._optimize_futures(wait_for) if wait_for else None,
            dependencies=dependencies,
            return_type="state",
            pure=False,
        )
        return PrefectDaskFuture[Any](wrapped_future=future, task_run_id=future.task_run_id)
