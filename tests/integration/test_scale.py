"""Scale-out: the flow on a real dask-distributed cluster, and batching/chunking in the flow."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from nst_core import storage
from nst_core.params import StyleParams

TINY = StyleParams(size=32, iterations=3, weights="random:0")


def write_manifest(path: Path, sample_images: Path, rows: int) -> str:
    lines = ["id,content_uri,style_uri,seed,init"]
    contents, styles = ("tubingen.jpg", "hoovertowernight.jpg"), ("starry_night.jpg", "shipwreck.jpg")
    for i in range(rows):
        lines.append(f"r{i},{sample_images / contents[i % 2]},{sample_images / styles[(i // 2) % 2]},{i},noise")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def read_results(summary: dict) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(summary["results_csv"])), dtype=str, keep_default_na=False)


async def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.slow
def test_dask_cluster_two_workers_each_item_once(prefect_server, sample_images, tmp_path, monkeypatch):
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    from flows.stylize_manifest import on_dask

    # The worker processes report task runs to the same Prefect server as this process.
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    manifest = write_manifest(tmp_path / "m.csv", sample_images, rows=8)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
        host="127.0.0.1", dashboard_address=None,
    ) as cluster:  # fmt: skip
        state = on_dask(cluster.scheduler_address)(
            manifest_uri=manifest, output_uri=str(tmp_path / "out"), defaults=TINY,
            allow_local_paths=True, batch_size=1, retries=0, return_state=True,
        )  # fmt: skip
    summary = state.result()
    assert summary["counts"]["succeeded"] == 8
    results = read_results(summary)
    assert results["item_id"].nunique() == 8
    workers = set()
    for item in results["item_id"]:
        meta = json.loads(storage.read_bytes(str(tmp_path / "out" / "items" / item / "meta.json")))
        workers.add(meta["worker"])
    assert len(workers) == 2, workers  # both worker processes did work
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    stylize_runs = [r for r in runs if r.name.startswith("stylize row")]  # named by tasks.naming: "stylize row 3: id"
    assert len(stylize_runs) == 8  # one per item (batch_size=1) ...
    assert all(r.state.is_completed() and r.run_count == 1 for r in stylize_runs)  # ... each run exactly once


UUID_KEY = re.compile(r".+-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_the_dask_runner_submits_task_runs_without_hashing_them(prefect_server):
    """Each task run reaches dask as an impure call: named by a fresh uuid, not by a hash of its arguments
    (dask's default, most of a submission's cost: flows/dask_runner.py), in the runner Prefect copies for a run."""
    from distributed import LocalCluster
    from prefect import flow, task

    from flows.dask_runner import ImpureDaskTaskRunner

    @task
    def double(x: int) -> int:
        return 2 * x

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None) as cluster:

        @flow(task_runner=ImpureDaskTaskRunner(address=cluster.scheduler_address))
        def twice() -> tuple[list[str], list[int]]:
            futures = [double.submit(3), double.submit(3)]  # identical calls: two task runs all the same
            return [f.wrapped_future.key for f in futures], [f.result() for f in futures]

        keys, values = twice()
    assert values == [6, 6]
    assert len(set(keys)) == 2 and all(UUID_KEY.fullmatch(k) for k in keys), keys


def test_compatible_items_share_a_batch_and_match_alone(prefect_server, sample_images, tmp_path):
    """Same-size items with the same parameters run as one batch; results close to single runs."""
    from flows.stylize_manifest import stylize_manifest

    manifest = write_manifest(tmp_path / "m.csv", sample_images, rows=4)
    batched = stylize_manifest(
        manifest_uri=manifest, output_uri=str(tmp_path / "batched"), defaults=TINY,
        allow_local_paths=True, batch_size=4, return_state=True,
    ).result()  # fmt: skip
    alone = stylize_manifest(
        manifest_uri=manifest, output_uri=str(tmp_path / "alone"), defaults=TINY,
        allow_local_paths=True, batch_size=1, return_state=True,
    ).result()  # fmt: skip
    b, a = read_results(batched), read_results(alone)
    assert list(b["item_id"]) == list(a["item_id"])  # batching is not part of an item's identity
    sizes = []
    for item in b["item_id"]:
        meta = json.loads(storage.read_bytes(str(tmp_path / "batched" / "items" / item / "meta.json")))
        sizes.append(meta["batch_size"])
    # tubingen (4:3) and hoover (19:10) differ in shape: two batches of two.
    assert sizes == [2, 2, 2, 2]
    for lb, la in zip(b["loss_total"].astype(float), a["loss_total"].astype(float), strict=True):
        assert lb == pytest.approx(la, rel=0.02)


def test_no_chunk_waits_for_a_slower_one(prefect_server, sample_images, tmp_path):
    """A slow item in the first chunk does not hold up later chunks (old code: each chunk waited for
    its slowest batch), and the results parts hold every row once."""
    from flows.stylize_manifest import stylize_manifest

    path = Path(write_manifest(tmp_path / "m.csv", sample_images, rows=6))
    lines = path.read_text().splitlines()
    lines[0] += ",iterations,tolerance"
    lines[1:] = [line + (",300,0" if i == 0 else ",1,0") for i, line in enumerate(lines[1:])]
    path.write_text("\n".join(lines) + "\n")
    state = stylize_manifest(
        manifest_uri=str(path), output_uri=str(tmp_path / "o"), defaults=TINY,
        allow_local_paths=True, chunk_size=2, batch_size=1, return_state=True,
    )  # fmt: skip
    summary = state.result()
    assert summary["counts"]["succeeded"] == 6
    runs = [r for r in asyncio.run(_task_runs(state.state_details.flow_run_id)) if r.name.startswith("stylize row")]
    slow = next(r for r in runs if r.name.startswith("stylize row 1:"))
    later = [r for r in runs if r.name.startswith(("stylize row 5:", "stylize row 6:"))]  # the third chunk's
    assert len(later) == 2 and all(r.start_time < slow.end_time for r in later), [(r.name, r.start_time, r.end_time) for r in runs]
    parts = [u for u in storage.list_prefix(summary["run_folder"]) if "/parts/" in u]
    rows = [row for part in parts for row in pd.read_csv(io.BytesIO(storage.read_bytes(part)))["row"]]
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]  # written as they settled, a chunk's worth (2) per part


def test_device_work_runs_on_the_devices_own_thread():
    """All PyTorch work on a device runs on one long-lived thread (nst_run.execute.DevicePool), whatever
    task thread asks: many OpenMP teams on a small CPU slowed the optimisation by a quarter."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from nst_run.execute import DevicePool

    pool = DevicePool()

    def ask(_: int) -> str:
        with pool.acquire("cpu") as device:
            return pool.run(device, lambda: threading.current_thread().name)

    with ThreadPoolExecutor(4) as askers:
        names = set(askers.map(ask, range(8)))
    assert names == {"nst-cpu_0"}
    with pool.acquire("cpu") as device, pytest.raises(ZeroDivisionError):
        pool.run(device, lambda: 1 / 0)


def test_a_device_is_lent_once_however_it_is_asked_for():
    """``auto`` and the device's own name (``cpu`` here; ``cuda`` on a GPU machine, which is ``cuda:0``)
    are one device: while one optimisation holds it, another waits, whichever way it asked (old code:
    an explicit name took a lock of its own, so both ran at once)."""
    import threading

    import torch

    from nst_run.execute import DevicePool

    pool = DevicePool()
    name = "cpu" if pool.devices == [torch.device("cpu")] else "cuda"
    events: list[str] = []
    lent = threading.Event()

    def second() -> None:
        with pool.acquire(name) as device:
            events.append(f"second got {device}")
            lent.set()

    with pool.acquire("auto") as first:
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not lent.wait(0.5), "lent twice"  # a wrongly shared device is lent at once
        events.append(f"first gives back {first}")
    assert lent.wait(30)
    waiter.join()
    assert events == [f"first gives back {pool.devices[0]}", f"second got {pool.devices[0]}"]


def test_an_item_named_by_rows_of_two_chunks_is_computed_once_and_both_rows_succeed(prefect_server, sample_images, tmp_path):
    """Two rows asking for the same picture, in different chunks: one computation, and the second row is
    reported ``succeeded`` by this run (old code: ``cached``, as if an earlier run had made it)."""
    from flows.stylize_manifest import stylize_manifest

    path = Path(write_manifest(tmp_path / "m.csv", sample_images, rows=1))
    first = path.read_text().splitlines()[1]
    path.write_text(path.read_text() + first.replace("r0,", "again,", 1) + "\n")
    summary = stylize_manifest(
        manifest_uri=str(path), output_uri=str(tmp_path / "o"), defaults=TINY,
        allow_local_paths=True, chunk_size=1, return_state=True,
    ).result()  # fmt: skip
    results = read_results(summary)
    assert list(results["status"]) == ["succeeded", "succeeded"], results[["id", "status"]]
    assert results["item_id"].nunique() == 1


STRAY_TIMERS = 2
"""Task runs a cancelled asyncio timer may still hold after the events are delivered (seen: 1)."""


def test_once_events_are_delivered_prefect_holds_no_chunk_of_finished_task_runs(prefect_server):
    """Each event a task run emits waits in Prefect's events worker queue with a copy of its context (the
    task run, its parameters, result, transaction): a flow that outruns the worker grows by ~25 kB per
    task run. Before each chunk the flow waits for the worker (flows.events.wait_for_delivery); after that
    wait no chunk's worth of finished task runs may still be held, whoever holds it. (Counts live objects,
    no timing: on this 2-core machine a chunk of 64 trivial task runs left 106-163 of these objects alive
    without the wait.) What may remain is not the events' doing and does not grow with the chunks: on a
    loaded machine, now and then (in 3 fresh processes of 26 beside three busy processes), one task run's context was
    still held after the wait, in every chunk, by a cancelled asyncio timer (a `TimerHandle` left in an event loop's queue) that had
    copied the context when it was scheduled from inside the task run (an event loop drops a cancelled
    timer when its deadline comes); its TaskRunContext and TaskRun make 2 objects. So: at most
    ``STRAY_TIMERS`` task runs' objects per chunk, and no more after the last chunk than after the first."""
    import gc

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.client.schemas.objects import TaskRun
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.futures import wait
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.events import DELIVERY_WAIT_S, wait_for_delivery

    def held() -> int:
        """This flow run's task runs still alive (earlier tests in the session may leave their own)."""
        context = FlowRunContext.get()
        assert context is not None and context.flow_run is not None
        gc.collect()
        runs = [o.task_run if type(o) is TaskRunContext else o for o in gc.get_objects() if type(o) in (TaskRun, TaskRunContext)]
        return sum(run.flow_run_id == context.flow_run.id for run in runs)

    @task(cache_policy=NO_CACHE)
    def trivial(i: int) -> list[int]:
        return [i]

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=8))
    def chunks_of_trivial_tasks() -> list[tuple[bool, int]]:
        after_each_chunk = []
        for start in range(0, 192, 64):
            futures = [trivial.submit(i) for i in range(start, start + 64)]
            wait(futures)
            assert [f.result() for f in futures] == [[i] for i in range(start, start + 64)]
            del futures
            after_each_chunk.append((wait_for_delivery(DELIVERY_WAIT_S), held()))
        return after_each_chunk

    after_each_chunk = chunks_of_trivial_tasks()
    assert [delivered for delivered, _ in after_each_chunk] == [True] * 3
    held_counts = [count for _, count in after_each_chunk]
    assert max(held_counts) <= 2 * STRAY_TIMERS, held_counts  # a chunk's worth, without the wait: 106-163
    assert held_counts[-1] <= held_counts[0], held_counts  # not growing with the chunks


def test_the_flow_keeps_nothing_per_settled_row(prefect_server, sample_images, tmp_path):
    """What Prefect keeps in the flow's process per task run is bounded by the work in flight, not by
    the rows settled: a cancel event per task run and a state per returned object (flows.retention).
    Old code: 46 states kept at the last row (10 before the first), an event and an asset record for
    every task run."""
    from prefect.context import FlowRunContext

    from flows.progress import listening
    from flows.stylize_manifest import stylize_manifest

    rows = 12
    seen: list[tuple[int, int, int, int]] = []  # (rows done, states, cancel events, asset records kept) at each progress update

    def count(progress) -> None:
        context = FlowRunContext.get()
        assert context is not None
        seen.append((progress.done, len(context.run_results), len(getattr(context.task_runner, "_cancel_events", {})), len(context.task_run_assets)))

    with listening(count):
        summary = stylize_manifest(
            manifest_uri=write_manifest(tmp_path / "m.csv", sample_images, rows=rows), output_uri=str(tmp_path / "o"),
            defaults=StyleParams(size=32, iterations=1, weights="random:0"), allow_local_paths=True, chunk_size=2, batch_size=1,
            return_state=True,
        ).result()  # fmt: skip
    assert summary["counts"]["succeeded"] == rows
    (first_done, first_states, _, _), (last_done, last_states, last_events, last_assets) = seen[0], seen[-1]
    assert first_done == 0 and last_done == rows, seen
    # Before any row settled: the run's own results (manifest, limits) and the first chunks' Work items.
    # At the end, fewer: nothing is kept for the 12 rows settled, and no finished task run's event.
    assert last_states <= first_states and last_events == 0, seen
    # Asset records (empty: no task here has assets) are dropped as each unit is collected.
    assert last_assets <= 1, seen
