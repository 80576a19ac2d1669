"""What Prefect keeps per task run while a flow runs: a flow submitting N trivial tasks in chunks (not a CI test).

    .venv/bin/python benchmarks/prefect_task_growth.py --tasks 640 --json benchmarks/results/prefect-task-growth.json

The soak's memory growth per item, without the engine: each task returns ``[Out(i)]`` (a dataclass with
a 200-character dict), the flow waits for each chunk of 64 (as ``flows/stylize_manifest.py`` does) and
drops its futures. Measured twice, each in a fresh process: as Prefect leaves it, and with the flow
dropping after each chunk the two per-task-run records Prefect 3 never drops during a flow run
(:func:`forget_task_runs`): ``FlowRunContext.run_results`` (a state copy per result and per element of
it) and ``ThreadPoolTaskRunner._cancel_events`` (a ``threading.Event`` per task run). Reports both
records' sizes at the end and the Python heap's growth (tracemalloc) over the second half, per 1,000
task runs, and the allocation sites that grew most.
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


@dataclass
class Out:
    row: int
    meta: dict[str, str] = field(default_factory=lambda: {"k": "v" * 200})


def measure(tasks: int, chunk: int, forget: bool) -> dict[str, Any]:
    import linecache

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.context import FlowRunContext
    from prefect.futures import as_completed
    from prefect.task_runners import ThreadPoolTaskRunner

    @task(cache_policy=NO_CACHE)
    def work(i: int) -> list[Out]:
        return [Out(i)]

    snapshots: list[Any] = []

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=8))
    def many() -> tuple[int, int, list[tuple[int, float]]]:
        context = FlowRunContext.get()
        marks = []
        for start in range(0, tasks, chunk):
            futures = [work.submit(i) for i in range(start, min(tasks, start + chunk))]
            for future in as_completed(futures):
                future.result()
            if forget:
                forget_task_runs(f.task_run_id for f in futures)
            del futures
            gc.collect()
            if start + chunk == (tasks // chunk // 2) * chunk:
                snapshots.append(tracemalloc.take_snapshot())
            marks.append((start + chunk, tracemalloc.get_traced_memory()[0] / 2**20))
        return len(context.run_results), len(getattr(context.task_runner, "_cancel_events", {})), marks

    tracemalloc.start(10)
    kept, events, marks = many()
    end = tracemalloc.take_snapshot()
    half = next(m for m in marks if m[0] >= (tasks // chunk // 2) * chunk)
    sites = []
    for stat in end.compare_to(snapshots[0], "traceback")[:6]:
        frames = [f"{Path(f.filename).name}:{f.lineno} {linecache.getline(f.filename, f.lineno).strip()[:80]}" for f in stat.traceback[-4:]]
        sites.append({"mb": round(stat.size_diff / 2**20, 2), "blocks": stat.count_diff, "frames": frames})
    return {
        "forget": forget, "tasks": tasks, "run_results_at_end": kept, "cancel_events_at_end": events,
        "python_heap_growth_mb_per_1000_task_runs": round((marks[-1][1] - half[1]) * 1000 / (marks[-1][0] - half[0]), 2),
        "grew_most": sites,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=640)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--one", choices=["keep", "forget"], help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--json")
    args = parser.parse_args()
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("PREFECT_LOGGING_LEVEL", "WARNING")):
        os.environ.setdefault(name, value)
    if args.one:
        print("RESULT " + json.dumps(measure(args.tasks, args.chunk, args.one == "forget")))
        return
    results = []
    for mode in ("keep", "forget"):
        out = subprocess.run([sys.executable, __file__, "--tasks", str(args.tasks), "--chunk", str(args.chunk), "--one", mode],
                             capture_output=True, text=True, check=True)  # fmt: skip
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(json.dumps(result, indent=2))
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
