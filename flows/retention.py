"""What Prefect keeps per task run in the flow's process, let go once the flow has used it.

Prefect 3.8 keeps three records of every task run for the whole flow run, finished or not. On a
100,000-row manifest they are the flow process's growth (counted by ``benchmarks/soak.py
--count-objects``: one ``threading.Event``, ``State``, ``StateDetails`` and ``UUID`` per task run):

- ``ThreadPoolTaskRunner._cancel_events``: an event per submitted task run, set when the runner shuts
  down so running tasks can stop. A finished task run needs none: :class:`ThreadPoolRunner` drops
  each one when its task run finishes.
- ``FlowRunContext.run_results``: a copy of a task run's final state per object it returned (the result
  and each of its elements), so a later task given that object is drawn as depending on it. Entries
  stay after the object is gone (PrefectHQ/prefect#20558). :func:`forget_result` drops a consumed
  result's entries; :func:`forget_dead_results` drops those whose object no longer exists.
- ``FlowRunContext.task_run_assets``: the assets each task run passes downstream, an empty set for a
  task without assets (all of this project's). :func:`forget_no_assets` drops the empty ones: a task
  run that is not in it has none, as Prefect reads it.

All three reach into Prefect's private state, checked for its type: if a Prefect release renames it, these
become no-ops (the growth comes back; ``tests/integration/test_scale.py`` fails) rather than errors.
"""

from __future__ import annotations

from typing import Any

from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner


class ThreadPoolRunner(ThreadPoolTaskRunner):
    """Prefect's thread pool task runner, holding a cancel event only while its task run is unfinished."""

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        future = super().submit(task, parameters, wait_for, dependencies)
        events = getattr(self, "_cancel_events", None)
        if isinstance(events, dict):
            future.add_done_callback(lambda done: events.pop(done.task_run_id, None))
        return future


def _run_results() -> dict[int, Any] | None:
    context = FlowRunContext.get()
    results = getattr(context, "run_results", None)
    return results if isinstance(results, dict) else None


def forget_result(result: Any, with_elements: bool = True) -> None:
    """Drop what the flow run keeps for ``result`` (a task's return value, still alive) and its elements.

    Call it only for objects no later task is given: a task given one would no longer be drawn as
    depending on the task that returned it (``with_elements=False`` keeps the elements' entries)."""
    results = _run_results()
    if results is None:
        return
    elements = result if with_elements and isinstance(result, list | tuple | set) else ()
    for obj in (result, *elements):
        results.pop(id(obj), None)  # obj is alive, so an entry under its id is its own or a stale one


def forget_dead_results() -> int:
    """Drop the flow run's entries for returned objects that no longer exist; how many were dropped.

    Objects without weak references (lists, dicts) cannot be told alive or dead here: they are
    :func:`forget_result`'s."""
    results = _run_results()
    if results is None:
        return 0
    dead = [key for key, entry in list(results.items()) if isinstance(entry, tuple) and len(entry) == 3 and entry[2] is not None and entry[2]() is None]
    for key in dead:
        results.pop(key, None)
    return len(dead)


def forget_no_assets() -> int:
    """Drop the flow run's records of task runs that pass no assets downstream; how many were dropped."""
    assets = getattr(FlowRunContext.get(), "task_run_assets", None)
    if not isinstance(assets, dict):
        return 0
    empty = [task_run_id for task_run_id, found in list(assets.items()) if not found]
    for task_run_id in empty:
        assets.pop(task_run_id, None)
    return len(empty)
