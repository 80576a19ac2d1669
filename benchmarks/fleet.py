"""Fleet: how busy the real flow keeps K devices of a dask cluster (not a CI test).

    .venv/bin/python benchmarks/fleet.py                          # stand-in engine, K = 1, 4, 16, 64
    .venv/bin/python benchmarks/fleet.py --workers 4 --chunk-size 8
    .venv/bin/python benchmarks/fleet.py --real --workers 2       # the real engine, 2 worker processes
    .venv/bin/python benchmarks/fleet.py --workers 4 16 --order manifest cost   # against manifest order

**Stand-in mode** (the default) simulates a GPU fleet on this machine: a dask ``LocalCluster`` of K
workers (threads of this process, ``--nthreads 3 --resources GPU=1`` each, as the README starts
them; ``NST_TASKS_PER_DEVICE`` sets both), the real flow, the real Prefect server, real storage I/O against a local SeaweedFS server,
and ``STAND_IN_ENGINE`` in place of the optimisation: it holds its worker's one device for a time
per item and returns a small real image, so everything around the engine (leases, fetches, uploads,
the results table, the report) is the real code. The times are long-tailed the way real ones are:
each row asks for a log-normal number of iterations (median 40, p99 about 4x), which the flow sees,
and each item stops early at a fraction of them (uniform 0.6 to 1) which nobody knows in advance. The stand-in
exists only in this benchmark; every test of the engine runs the real VGG-19.

**Real mode** (``--real``) is the issue's measurement: 2 single-threaded-torch worker processes,
24 rows where every 8th has 150 iterations and the rest 10, 64 px, ``--chunk-size 8 --batch-size 1``;
the busy time is each worker's time inside the real ``_optimise_and_judge`` (recorded by a worker plugin).

``--order manifest cost`` runs the baseline (units dispatched in manifest order) and the flow as it
is (the costliest first: the whole manifest by :func:`nst_run.planning.rows_costliest_first`, then the units
waiting by :func:`nst_run.planning.costliest_first`) one after the other in the same run.

Reported per K: the busy fraction (time devices spent optimising / (K x the span from the first
optimisation's start to the last one's end)), the same over the flow's whole wall time, and the
dispatch rate: items settled per second of the dispatch loop's own work (from its first wait for a
task to its last, less the time spent waiting), i.e. how many items per second this flow can keep
in flight.

``FLEET_PROFILE=PATH`` writes a cProfile of the flow's thread (the dispatch loop) to PATH; it slows the
loop, so the dispatch rate of a profiled run is a floor. ``--fleet-nice N`` runs the stand-in workers
at niceness N, so that on a small machine they leave the cores to the flow's loop.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import nst_samples  # noqa: E402

SAMPLES = nst_samples.folder()
SIGMA = 0.6  # log-normal spread of the stand-in rows' iterations: p99 is about 4x the median
MEDIAN_ITERATIONS = 40
EARLY_STOP = (0.6, 1.0)  # the fraction of its iterations an item runs before it converges: not known in advance


def _seeded_uniform(seed: str) -> float:
    """A number in (0, 1), the same for the same ``seed`` in every process."""
    return ((int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) % 10_000) + 0.5) / 10_000


def stand_in_iterations(rows: int) -> list[int]:
    """Each stand-in row's ``iterations`` (a manifest column the flow sees): log-normal, seeded by the row."""
    normal = [math.sqrt(2) * _erfinv(2 * _seeded_uniform(f"row{i}") - 1) for i in range(rows)]
    return [max(1, round(MEDIAN_ITERATIONS * math.exp(SIGMA * z))) for z in normal]


def early_stop_fraction(item_id: str) -> float:
    """Where a stand-in item stops, as a fraction of its iterations: uniform over EARLY_STOP, seeded by the item."""
    return EARLY_STOP[0] + (EARLY_STOP[1] - EARLY_STOP[0]) * _seeded_uniform(item_id)


class Busy:
    """Intervals each device spent optimising: (device name, start, end)."""

    def __init__(self) -> None:
        self.intervals: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()

    def add(self, device: str, start: float, end: float) -> None:
        with self.lock:
            self.intervals.append((device, start, end))

    def figures(self, devices: int, wall_s: float) -> dict[str, float]:
        if not self.intervals:
            return {"busy_fraction": 0.0, "busy_fraction_of_wall": 0.0}
        busy = sum(end - start for _, start, end in self.intervals)
        first, last = min(s for _, s, _ in self.intervals), max(e for _, _, e in self.intervals)
        per_device: dict[str, list[float]] = {}
        began: dict[str, float] = {}  # each device's first start and last end, from the span's start
        finished: dict[str, float] = {}
        for name, start, end in self.intervals:
            per_device.setdefault(name, []).append(end - start)
            began[name] = min(began.get(name, math.inf), start - first)
            finished[name] = max(finished.get(name, -math.inf), end - first)
        span_total = devices * (last - first)
        ramp = sum(began.values()) + (devices - len(per_device)) * (last - first)  # a device never used idles throughout
        tail = sum(last - first - end for end in finished.values())
        return {
            # Where the devices' idle time went, as shares of K x span: before each device's first item (the
            # flow filling the window), after its last (the run's end), and between items (turnover).
            "idle_share_ramp_between_tail": [ramp / span_total, 1 - busy / span_total - (ramp + tail) / span_total, tail / span_total],
            "busy_fraction": busy / span_total, "busy_fraction_of_wall": busy / (devices * wall_s),
            "span_s": last - first, "devices_used": len(per_device),
            "device_busy_s_min_max": [min(map(sum, per_device.values())), max(map(sum, per_device.values()))],
            "device_last_end_s_min_max": [min(finished.values()), max(finished.values())],
        }  # fmt: skip


def stand_in_engine(busy: Busy, s_per_iteration: float):  # type: ignore[no-untyped-def]
    """STAND_IN_ENGINE: replaces ``nst_run.execute._run_batch`` (device held, optimise, judge): holds the
    calling dask worker's device (one lock per worker) for ``s_per_iteration`` times the row's iterations
    times where it stops early (:func:`early_stop_fraction`) per item, as the real engine's time follows
    the work a row asks for and where its optimisation converges."""
    import torch

    from nst_core.engine import StyleResult

    locks: dict[str, threading.Lock] = {}
    guard = threading.Lock()

    def run_batch(batch, time_limit_s, hold_device):  # type: ignore[no-untyped-def]
        from distributed import get_worker

        name = str(get_worker().name)
        with guard:
            lock = locks.setdefault(name, threading.Lock())
        results = []
        with lock, hold_device():
            for work, _loaded in batch:
                duration = s_per_iteration * work.row.params.iterations * early_stop_fraction(work.item_id)
                start = time.perf_counter()
                time.sleep(duration)
                busy.add(name, start, time.perf_counter())
                history = [{"iteration": 0, "total": 1.0, "content": 0.5, "style": 0.5, "tv": 0.0}]
                results.append(StyleResult(torch.rand(3, 16, 16), history, 1, duration, f"standin:{name}", "random:0", work.row.params))
        for result in results:
            result.extra["quality"] = {"style_distance": 0.0, "content_distance": 0.0}
        return results

    return run_batch


def _erfinv(y: float) -> float:
    """Inverse error function by Newton's method (no SciPy here)."""
    x = 0.0
    for _ in range(60):
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


class DispatchClock:
    """Time the flow thread spends waiting in its sliding window (the rest of the loop is its own work)."""

    def __init__(self) -> None:
        self.waited_s = 0.0
        self.first: float | None = None
        self.last = 0.0
        self.cpu_first: float | None = None
        self.cpu_last = 0.0

    @property
    def own_s(self) -> float:
        """The dispatch loop's own time: from its first wait to its last, less the waiting."""
        return max(1e-9, self.last - (self.first or self.last) - self.waited_s)

    @property
    def own_cpu_s(self) -> float:
        """The CPU time of the flow's thread over the same stretch (waiting costs it none; the dask client's
        own thread, which sends what the flow submits, is not in it)."""
        return max(1e-9, self.cpu_last - (self.cpu_first if self.cpu_first is not None else self.cpu_last))

    def install(self):  # type: ignore[no-untyped-def]
        from flows import stylize_manifest as module

        real = module.SlidingWindow.next_done
        clock = self

        def timed(self, also=None):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            clock.first = clock.first or start
            clock.cpu_first = time.thread_time() if clock.cpu_first is None else clock.cpu_first
            try:
                return real(self, also)
            finally:
                clock.last = time.perf_counter()
                clock.cpu_last = time.thread_time()
                clock.waited_s += clock.last - start

        module.SlidingWindow.next_done = timed
        return real


@contextlib.contextmanager
def dispatch_order(order: str):  # type: ignore[no-untyped-def]
    """``cost``: the flow as it is (rows and units costliest first); ``manifest``: the baseline, manifest order."""
    from flows import stylize_manifest as module

    real = module.costliest_first, module.rows_costliest_first
    if order == "manifest":
        module.costliest_first = module.rows_costliest_first = list
    try:
        yield
    finally:
        module.costliest_first, module.rows_costliest_first = real


def write_manifest(bucket: str, rows: int, iterations: list[int] | None = None) -> str:
    from nst_core import storage

    for name in ("tubingen.jpg", "starry_night.jpg", "hoovertowernight.jpg", "shipwreck.jpg"):
        storage.write_bytes(f"s3://{bucket}/in/{name}", (SAMPLES / name).read_bytes())
    lines = ["id,content_uri,style_uri,seed,iterations"]
    for i in range(rows):
        content = ("tubingen.jpg", "hoovertowernight.jpg")[i % 2]
        style = ("starry_night.jpg", "shipwreck.jpg")[(i // 2) % 2]
        its = iterations[i] if iterations else 5
        lines.append(f"r{i},s3://{bucket}/in/{content},s3://{bucket}/in/{style},{i},{its}")
    uri = f"s3://{bucket}/m-{rows}-{time.time_ns()}.csv"
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    return uri


def serve_stand_in_fleet(k: int, s_per_iteration: float, intervals_path: str, scheduler: str | None = None) -> None:
    """In a child process: ``k`` dask workers (threads) running STAND_IN_ENGINE, with their own scheduler
    (its address printed) or joining ``scheduler``; serves until stdin closes, then writes the
    devices' busy intervals to ``intervals_path``.

    The fleet lives in processes of its own, as it does on other machines in a real deployment, so
    the workers do not compete with the flow's dispatch loop (or with too many others) for one GIL."""
    import asyncio

    from distributed import LocalCluster, Worker

    import nst_run.execute as execute
    from flows.stylize_manifest import _tasks_per_device

    threads = _tasks_per_device()  # the flow's task runs per device: each worker runs that many at once
    busy = Busy()
    execute._run_batch = stand_in_engine(busy, s_per_iteration)
    bodies: list[tuple[float, float, int]] = []
    real_body = execute.stylize_items

    def timed_body(works, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return real_body(works, *args, **kwargs)
        finally:
            bodies.append((start, time.perf_counter(), len(works)))

    execute.stylize_items = timed_body
    if scheduler is None:
        with LocalCluster(n_workers=k, threads_per_worker=threads, processes=False, resources={"GPU": 1}, dashboard_address=None,
                          protocol="tcp", host="127.0.0.1") as cluster:  # fmt: skip
            print(cluster.scheduler_address, flush=True)
            sys.stdin.read()
    else:

        async def serve() -> None:
            workers = [await Worker(scheduler, nthreads=threads, resources={"GPU": 1}, host="127.0.0.1", name=f"{os.getpid()}-{i}") for i in range(k)]
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            for worker in workers:
                await worker.close()

        asyncio.run(serve())
    Path(intervals_path).write_text(json.dumps(busy.intervals))
    Path(intervals_path + ".bodies").write_text(json.dumps(bodies))


WORKERS_PER_PROCESS = 8


def run_stand_in(k: int, items_per_device: int, mean_s: float, chunk_size: int, bucket: str, fleet_nice: int = 0) -> dict[str, float]:
    import subprocess

    from prefect.settings import PREFECT_API_URL

    from flows.stylize_manifest import on_dask
    from nst_core.params import StyleParams

    clock = DispatchClock()
    real_next = clock.install()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    iterations = stand_in_iterations(k * items_per_device)
    s_per_iteration = mean_s / (sum(iterations) / len(iterations) * sum(EARLY_STOP) / 2)  # items average mean_s
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [min(WORKERS_PER_PROCESS, k - i) for i in range(0, k, WORKERS_PER_PROCESS)]
        paths = [str(Path(tmp) / f"intervals-{i}.json") for i in range(len(sizes))]
        fleets: list[subprocess.Popen[str]] = []

        def start(size: int, path: str, scheduler: str | None) -> subprocess.Popen[str]:
            code = f"import fleet; fleet.serve_stand_in_fleet({size}, {s_per_iteration}, {path!r}, {scheduler!r})"
            nice = ["nice", "-n", str(fleet_nice)] if fleet_nice else []  # the workers yield the cores to the flow (on a fleet they have their own)
            return subprocess.Popen([*nice, sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip

        try:
            fleets.append(start(sizes[0], paths[0], None))
            assert fleets[0].stdout is not None
            address = fleets[0].stdout.readline().strip()
            for size, path in zip(sizes[1:], paths[1:], strict=True):
                fleets.append(start(size, path, address))
            for extra in fleets[1:]:
                assert extra.stdout is not None and extra.stdout.readline().strip() == "ready"
            manifest = write_manifest(bucket, k * items_per_device, iterations)
            start_s = time.perf_counter()
            profiler = cProfile.Profile() if os.environ.get("FLEET_PROFILE") else None
            if profiler:
                profiler.enable()  # the flow's own thread: the dispatch loop
            state = on_dask(address)(
                manifest_uri=manifest, output_uri=f"s3://{bucket}/out-{k}-{chunk_size}-{time.time_ns()}",
                defaults=StyleParams(size=16, weights="random:0"), chunk_size=chunk_size, retries=0, return_state=True,
            )  # fmt: skip
            wall = time.perf_counter() - start_s
            if profiler:
                profiler.disable()
                profiler.dump_stats(os.environ["FLEET_PROFILE"])
            summary = state.result()
            for fleet in reversed(fleets):
                assert fleet.stdin is not None
                fleet.stdin.close()
                fleet.wait(120)
        finally:
            for fleet in fleets:
                if fleet.poll() is None:
                    fleet.kill()
            from flows import stylize_manifest as module

            module.SlidingWindow.next_done = real_next
        busy = Busy()
        busy.intervals = [tuple(i) for path in paths for i in json.loads(Path(path).read_text())]  # type: ignore[misc]
        bodies = [b for path in paths for b in json.loads(Path(path + ".bodies").read_text())]
        if os.environ.get("FLEET_DEBUG"):
            t0 = min(b[0] for b in bodies)
            for b in sorted(bodies):
                print(f"body {b[0] - t0:7.2f} -> {b[1] - t0:7.2f}  items {b[2]}")
            for name, s0, e0 in sorted(busy.intervals, key=lambda i: i[1]):
                print(f"device {name} {s0 - t0:7.2f} -> {e0 - t0:7.2f}")
    done = summary["counts"]["succeeded"]
    figures = {"devices": k, "items": done, "chunk_size": chunk_size, "mean_item_s": mean_s, "wall_s": wall, **busy.figures(k, wall)}
    figures["dispatch_items_per_s"] = done / clock.own_s
    figures["dispatch_items_per_cpu_s"] = done / clock.own_cpu_s
    figures["fleet_nice"] = fleet_nice
    figures["needed_items_per_s"] = k / mean_s
    return figures


def run_real(workers: int, chunk_size: int, bucket: str) -> dict[str, float]:
    """The issue's measurement with the real engine: every 8th row 150 iterations, the rest 10, 64 px."""
    import io

    import pandas as pd
    from distributed import Client, LocalCluster
    from prefect.settings import PREFECT_API_URL

    from flows.stylize_manifest import on_dask
    from nst_core import storage
    from nst_core.params import StyleParams

    os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL", "")
    os.environ["OMP_NUM_THREADS"] = "1"
    iterations = [150 if i % 8 == 0 else 10 for i in range(24)]
    manifest = write_manifest(bucket, 24, iterations)
    output = f"s3://{bucket}/real-{time.time_ns()}"
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(n_workers=workers, threads_per_worker=2, processes=True,
                                                           resources={"GPU": 1}, dashboard_address=None) as cluster:  # fmt: skip
        intervals = Path(tmp) / "intervals.jsonl"
        with Client(cluster) as client:
            client.register_plugin(record_optimisations(str(intervals)))
        start = time.perf_counter()
        state = on_dask(cluster.scheduler_address)(
            manifest_uri=manifest, output_uri=output, chunk_size=chunk_size, batch_size=1, retries=0, return_state=True,
            defaults=StyleParams(size=64, weights="random:0", tolerance=0),
        )  # fmt: skip
        wall = time.perf_counter() - start
        summary = state.result()
        busy = Busy()
        busy.intervals = [tuple(json.loads(line)) for line in intervals.read_text().splitlines()]  # type: ignore[misc]
    table = pd.read_csv(io.BytesIO(storage.read_bytes(summary["results_csv"])))
    optimising = sum(float(json.loads(storage.read_bytes(f"{output}/items/{item}/meta.json"))["wall_time_s"]) for item in table["item_id"])
    if os.environ.get("FLEET_DEBUG"):
        t0 = min(s for _, s, _ in busy.intervals)
        for name, s0, e0 in sorted(busy.intervals, key=lambda i: i[1]):
            print(f"device {name} {s0 - t0:7.2f} -> {e0 - t0:7.2f}")
    return {"workers": workers, "items": int(summary["counts"]["succeeded"]), "chunk_size": chunk_size, "wall_s": wall,
            "optimising_s": optimising, **busy.figures(workers, wall)}  # fmt: skip


def record_optimisations(path: str):  # type: ignore[no-untyped-def]
    """A dask worker plugin for ``--real``: wraps the real ``nst_run.execute._optimise_and_judge`` (on the
    device's thread, the device held) on each worker to append (worker, start, end) in wall-clock seconds to a file."""

    from distributed import WorkerPlugin

    class RecordOptimisations(WorkerPlugin):
        def setup(self, worker) -> None:  # type: ignore[no-untyped-def]
            import nst_run.execute as execute

            real, name = execute._optimise_and_judge, str(worker.name)

            def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
                start = time.time()
                try:
                    return real(*args, **kwargs)
                finally:
                    with open(path, "a") as out:  # one short line per write: appends from processes do not interleave
                        out.write(json.dumps([name, start, time.time()]) + "\n")

            execute._optimise_and_judge = timed

    return RecordOptimisations()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--items-per-device", type=int, default=12)
    parser.add_argument("--mean-s", type=float, default=None,
                        help="stand-in mean seconds per item (default max(1, K/2): on 2 cores the whole simulation, flow, "
                             "Prefect server, S3 server and every worker's task engine, turns over about 2-4 task runs a second)")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[64])
    parser.add_argument("--order", nargs="+", choices=["cost", "manifest"], default=["cost"],
                        help="dispatch order: the flow's (cost: costliest first) and/or the baseline (manifest order), in the same run")  # fmt: skip
    parser.add_argument("--fleet-nice", type=int, default=0,
                        help="run the stand-in workers at this niceness, so that on a small machine they do not starve the flow's "
                             "dispatch loop of the cores (on a fleet the workers have machines of their own)")  # fmt: skip
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240"), ("PREFECT_LOGGING_LEVEL", "WARNING"),
                        # K simulated workers share this machine's cores, where a real fleet's each have their own: their
                        # statistical profiler and 20 ms ticks off (idle, 32 workers took 0.24 of a core with them, 0.085 without)
                        ("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False"), ("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "500ms")):  # fmt: skip
        os.environ.setdefault(name, value)
    from s3server import start_s3_server

    from nst_core import storage

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_s3_server(Path(tmp) / "s3")
        try:
            os.environ.update(server.env())
            storage.reset_clients()
            server.create_bucket("fleet")
            if args.real:
                from prefect.testing.utilities import prefect_test_harness

                with prefect_test_harness(server_startup_timeout=240):
                    for workers, chunk, order in itertools.product(args.workers, args.chunk_size, args.order):
                        with dispatch_order(order):
                            results.append({"order": order, **run_real(workers, chunk, "fleet")})
                            print(json.dumps(results[-1]), flush=True)
            else:
                from prefect.testing.utilities import prefect_test_harness

                with prefect_test_harness(server_startup_timeout=240):  # one server the flow and the fleet's process share
                    for k, chunk, order in itertools.product(args.workers, args.chunk_size, args.order):
                        with dispatch_order(order):
                            results.append({"order": order, **run_stand_in(k, args.items_per_device, args.mean_s or max(1.0, k / 2), chunk, "fleet", args.fleet_nice)})
                            print(json.dumps(results[-1]), flush=True)
        finally:
            server.stop()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"load_average": os.getloadavg(), "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
