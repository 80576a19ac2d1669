"""What Prefect keeps per task run while a flow runs: a flow submitting N trivial tasks in chunks (not a CI test).

    .venv/bin/python benchmarks/prefect_task_growth.py --tasks 640 --json benchmarks/results/prefect-task-growth.json

The soak's memory growth per item, without the engine: each task returns ``[Out(i)]`` (a dataclass with
a 200-character dict), the flow waits for each chunk of 64 (as ``flows/stylize_manifest.py`` does) and
drops its futures. Measured three times, each in a fresh process: as Prefect leaves it (``keep``); with the flow
dropping after each chunk the two per-task-run records Prefect 3 never drops during a flow run
(``forget``, :func:`forget_task_runs`): ``FlowRunContext.run_results`` (a state copy per result and per
element of it) and ``ThreadPoolTaskRunner._cancel_events`` (a ``threading.Event`` per task run); and
with the flow waiting for Prefect's events worker before each chunk (``drain``:
``flows.events.wait_for_delivery``); and both, the way ``flows/stylize_manifest.py`` does them
(``flow``: the wait, :class:`flows.retention.ThreadPoolRunner` and ``forget_result`` of each result). Reports both records' sizes
at the end, the Python heap's growth (tracemalloc) over the second half per 1,000 task runs, the
allocation sites that grew most, and the live ``TaskRun`` / ``TaskRunContext`` objects at the end:
how many, how many of them only the events worker's queued contexts reach, and how many are left
once that worker's queue is empty.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flows/, run from anywhere


def forget_task_runs(task_run_ids: Iterable[UUID]) -> int:
    """Drop the flow run's in-process records of these finished task runs (the fix proposed to the flow)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None:
        return 0
    done = set(task_run_ids)
    results: dict[int, tuple[Any, ...]] = getattr(context, "run_results", {})
    stale = [key for key, entry in results.items() if getattr(entry[0].state_details, "task_run_id", None) in done]
    for key in stale:
        results.pop(key, None)
    events = getattr(context.task_runner, "_cancel_events", None)
    if isinstance(events, dict):
        for task_run_id in done:
            events.pop(task_run_id, None)
    return len(stale)


MODES = ("keep", "forget", "drain", "flow")


@dataclass
class Out:
    row: int
    meta: dict[str, str] = field(default_factory=lambda: {"k": "v" * 200})


def events_worker() -> Any:
    """This process's Prefect events worker (the one ``emit_event`` sends to)."""
    from prefect.events.worker import EventsWorker

    return EventsWorker.instance()


def task_run_objects() -> list[Any]:
    """The live ``TaskRun`` and ``TaskRunContext`` objects (one of each per task run Prefect still holds)."""
    from prefect.client.schemas.objects import TaskRun
    from prefect.context import TaskRunContext

    gc.collect()
    return [o for o in gc.get_objects() if type(o) in (TaskRun, TaskRunContext)]


def reachable(roots: list[Any], stop: set[int]) -> set[int]:
    """Ids of every object reachable from ``roots`` through ``gc.get_referents``, not entering ``stop``."""
    seen = set(stop)
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) not in seen:
            seen.add(id(obj))
            stack.extend(gc.get_referents(obj))
    return seen - stop


def holders() -> dict[str, int]:
    """Who holds the live task-run objects: the events worker's queued contexts, or anything else.

    Reads Prefect's private ``EventsWorker._context_cache`` (a ``contextvars.Context`` copied per queued
    event, Prefect 3.8) and ``_queue``: this benchmark's diagnosis, not the flow's code."""
    worker = events_worker()
    cache = worker._context_cache
    live = task_run_objects()
    queued, cached = worker._queue.qsize(), len(cache)  # now: the walks below take a while, the worker goes on
    via_cache = reachable(list(cache.values()), set())
    roots = [m.__dict__ for m in list(sys.modules.values()) if m is not None] + list(sys._current_frames().values())
    elsewhere = reachable(roots, {id(cache), id(live)})  # every other root: modules' globals, threads' stacks
    return {
        "events_queued": queued, "contexts_cached": cached, "task_run_objects": len(live),
        "reachable_from_queued_contexts": sum(id(o) in via_cache for o in live),
        "reachable_otherwise": sum(id(o) in elsewhere for o in live),
    }  # fmt: skip


def measure(tasks: int, chunk: int, mode: str) -> dict[str, Any]:
    import linecache

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.context import FlowRunContext
    from prefect.futures import as_completed
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.events import DELIVERY_WAIT_S, wait_for_delivery
    from flows.retention import ThreadPoolRunner, forget_result

    @task(cache_policy=NO_CACHE)
    def work(i: int) -> list[Out]:
        return [Out(i)]

    snapshots: list[Any] = []

    @flow(task_runner=(ThreadPoolRunner if mode == "flow" else ThreadPoolTaskRunner)(max_workers=8))
    def many() -> tuple[int, int, list[tuple[int, float]]]:
        context = FlowRunContext.get()
        marks = []
        for start in range(0, tasks, chunk):
            futures = [work.submit(i) for i in range(start, min(tasks, start + chunk))]
            for future in as_completed(futures):
                result = future.result()
                if mode == "flow":
                    forget_result(result)
                del result
            if mode == "forget":
                forget_task_runs(f.task_run_id for f in futures)
            if mode in ("drain", "flow"):
                wait_for_delivery(DELIVERY_WAIT_S)
            del futures
            gc.collect()
            if start + chunk == (tasks // chunk // 2) * chunk:
                snapshots.append(tracemalloc.take_snapshot())
            marks.append((start + chunk, tracemalloc.get_traced_memory()[0] / 2**20))
        at_end = holders()
        events_worker().wait_until_empty()
        at_end["task_run_objects_once_events_sent"] = len(task_run_objects())
        return len(context.run_results), len(getattr(context.task_runner, "_cancel_events", {})), marks, at_end

    tracemalloc.start(10)
    kept, events, marks, at_end = many()
    end = tracemalloc.take_snapshot()
    half = next(m for m in marks if m[0] >= (tasks // chunk // 2) * chunk)
    sites = []
    for stat in end.compare_to(snapshots[0], "traceback")[:6]:
        frames = [f"{Path(f.filename).name}:{f.lineno} {linecache.getline(f.filename, f.lineno).strip()[:80]}" for f in stat.traceback[-4:]]
        sites.append({"mb": round(stat.size_diff / 2**20, 2), "blocks": stat.count_diff, "frames": frames})
    return {
        "mode": mode, "tasks": tasks, "at_end": at_end, "run_results_at_end": kept, "cancel_events_at_end": events,
        "python_heap_growth_mb_per_1000_task_runs": round((marks[-1][1] - half[1]) * 1000 / (marks[-1][0] - half[0]), 2),
        "grew_most": sites,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=640)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--json")
    args = parser.parse_args()
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("PREFECT_LOGGING_LEVEL", "WARNING")):
        os.environ.setdefault(name, value)
    if args.one:
        print("RESULT " + json.dumps(measure(args.tasks, args.chunk, args.one)))
        return
    results = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--tasks", str(args.tasks), "--chunk", str(args.chunk), "--one", mode],
                             capture_output=True, text=True, check=True)  # fmt: skip
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(json.dumps(result, indent=2))
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
