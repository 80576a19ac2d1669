"""Soak: many tiny items through the real flow against a local S3 server (not a CI test).

    .venv/bin/python benchmarks/soak.py                       # 2,000 items, 32 px, 5 iterations
    .venv/bin/python benchmarks/soak.py --items 200 --json benchmarks/results/soak-small.json
    .venv/bin/python benchmarks/soak.py --items 500 --local --tracemalloc 20   # what grows, by allocation site
    nice -n 10 .venv/bin/python benchmarks/soak.py --items 10000 --baseline-items 20 --sample 5 \
        --count-objects 300 --json benchmarks/results/soak-cpu-10000.json   # the long soak (README)

Reports items per minute, the flow's own overhead per item, peak memory (RSS)
of the flow process and of the Prefect server, and the flow process's memory
growth per 1,000 items (a least-squares slope of RSS against rows finished, over
the second half of the rows, after warm-up, while rows still finish; the rise
while the final tables and report are written after the last row is reported
apart, ``finish_rss_rise_mb``), with the RSS, rows finished and
Prefect's events backlog sampled every ``--sample`` seconds. With ``--json`` the
figures so far are rewritten every minute, so a run stopped early leaves them
(``finished: false``, ``rows_reached``). ``--count-objects`` counts gc-tracked
objects without collecting first: cyclic garbage not yet collected (matplotlib's
figures, for one) counts as live.

The overhead is measured against a baseline taken in the same run: the same
items through the engine alone (``nst_core.stylize``, network loaded, images
decoded, no Prefect, no S3), one after another. ``flow_overhead_per_item_s`` is
the flow's wall time per item minus the baseline's. (``engine_s`` is the time
spent inside the engine during the flow; it runs concurrently with the other
tasks' fetches, uploads and plots, so it is inflated by their contention, and
wall minus engine understates the overhead.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import nst_samples  # noqa: E402

SAMPLES = nst_samples.folder()


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().split()[3]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


class Sampler(threading.Thread):
    """Samples the RSS of this process and of its child processes (the Prefect server) every second.

    With ``snapshot_every_s``, also a tracemalloc snapshot that often (tracemalloc must be tracing) and
    the Python heap's traced size beside each RSS sample."""

    def __init__(self, snapshot_every_s: float = 0.0, count_every_s: float = 0.0, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []  # (time, flow MB, children MB)
        self.progress: list[tuple[float, int, int]] = []  # (time, rows finished, Prefect events queued for delivery)
        self.done = 0  # rows finished, as the flow publishes them (flows.progress)
        self.every_s = every_s
        self.checkpoint: Any = None  # called every 60 s (writes the figures so far)
        self.traced: list[tuple[float, float]] = []  # (time, Python heap MB traced by tracemalloc)
        self.snapshots: list[tuple[float, Any]] = []  # (time, tracemalloc.Snapshot)
        self.counts: list[tuple[float, Counter[str]]] = []  # (time, live gc-tracked objects per type, threads, fds)
        self.snapshot_every_s = snapshot_every_s
        self.count_every_s = count_every_s
        self.stop = threading.Event()

    def run(self) -> None:
        last_snapshot = last_count = last_checkpoint = time.time()
        while not self.stop.is_set():
            me = os.getpid()
            now = time.time()
            self.samples.append((now, rss_mb(me), sum(rss_mb(c) for c in children(me))))
            self.progress.append((now, self.done, events_backlog()))
            if self.snapshot_every_s:
                self.traced.append((now, tracemalloc.get_traced_memory()[0] / 2**20))
                if now - last_snapshot >= self.snapshot_every_s:
                    self.snapshots.append((now, tracemalloc.take_snapshot()))
                    last_snapshot = now
            if self.checkpoint and now - last_checkpoint >= 60:
                try:
                    self.checkpoint()
                except Exception as exc:  # the figures so far are a convenience: never stop sampling for them
                    print(f"soak: could not write the figures so far ({exc!r})", file=sys.stderr)
                last_checkpoint = now
            if self.count_every_s and now - last_count >= self.count_every_s:
                self.counts.append((now, live_objects()))
                last_count = now
            self.stop.wait(self.every_s)

    def on_progress(self, progress: Any) -> None:
        self.done = progress.done


def events_backlog() -> int:
    """Events this process's Prefect events worker has queued but not yet delivered to the server.

    Reads Prefect's private ``EventsWorker._instances`` and ``_queue`` (Prefect 3.8): a diagnostic of this
    benchmark only (-1 where they are gone). Each queued event keeps a copy of the context it was emitted
    in (``EventsWorker._context_cache``), with the task run's ``TaskRunContext`` and everything it holds."""
    try:
        from prefect.events.worker import EventsWorker

        with EventsWorker._instance_cache_lock:
            instances = list(EventsWorker._instances.values())  # type: ignore[misc]
        return sum(worker._queue.qsize() for worker in instances)
    except (ImportError, AttributeError):
        return -1


def live_objects() -> Counter[str]:
    """Live gc-tracked objects per type (module.qualname), plus this process's threads and open files."""
    found: Counter[str] = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    found["<threads>"] = threading.active_count()
    found["<open fds>"] = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    return found


def count_growth(first: Counter[str], last: Counter[str], per: float, top: int = 30) -> list[str]:
    """The types whose live count grew most from ``first`` to ``last``, scaled by ``per`` (items)."""
    grown = sorted(((last[k] - first.get(k, 0), k) for k in last), reverse=True)[:top]
    return [f"{diff * per:+10.0f} /1000 items  {last[k]:>9d} live  {k}" for diff, k in grown if diff > 0]


def heap_growth(first: Any, last: Any, top: int = 25) -> list[str]:
    """The allocation sites (tracebacks) whose live Python memory grew most from ``first`` to ``last``."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    first, last = first.filter_traces(ignore), last.filter_traces(ignore)
    lines = []
    for stat in last.compare_to(first, "traceback")[:top]:
        lines.append(f"{stat.size_diff / 2**20:+8.2f} MB {stat.count_diff:+8d} blocks")
        lines += [f"      {frame.filename}:{frame.lineno}" for frame in stat.traceback[-8:]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--baseline-items", type=int, default=100, help="items of the engine-alone baseline (0: none)")
    parser.add_argument("--local", action="store_true", help="inputs and outputs in a local folder (no S3 server)")
    parser.add_argument("--tracemalloc", type=float, default=0.0, metavar="SECONDS",
                        help="trace Python allocations (6 frames) and take a snapshot this often; prints what grew most "
                        "from the first snapshot after warm-up to the last (slows the run several times over)")  # fmt: skip
    parser.add_argument("--count-objects", type=float, default=0.0, metavar="SECONDS",
                        help="count live objects per type (and threads, open files) this often; prints which counts grew "
                        "per 1,000 items after warm-up (cheap)")  # fmt: skip
    parser.add_argument("--sample", type=float, default=1.0, metavar="SECONDS",
                        help="sample RSS, rows finished and the events backlog this often; with --json, the figures so far "
                        "are written there every 60 s, so a run stopped early still leaves its partial figures")  # fmt: skip
    args = parser.parse_args(argv)
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240"), ("PREFECT_LOGGING_LEVEL", "WARNING")):  # fmt: skip
        os.environ.setdefault(name, value)
    from s3server import start_s3_server

    import nst_run.execute as task_module
    from flows.progress import listening
    from flows.stylize_manifest import stylize_manifest
    from nst_core import storage
    from nst_core.params import StyleParams

    engine_seconds = [0.0]
    original = task_module.engine.stylize_batch

    def timed(jobs, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return original(jobs, **kwargs)
        finally:
            engine_seconds[0] += time.perf_counter() - t0

    task_module.engine.stylize_batch = timed
    baseline_per_item = baseline_in_a_fresh_process(args.size, args.iterations, min(args.items, args.baseline_items)) if args.baseline_items else 0.0
    if args.tracemalloc:
        tracemalloc.start(6)
    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.local else start_s3_server(Path(tmp) / "s3")
        try:
            if server:
                os.environ.update(server.env())
                storage.reset_clients()
                server.create_bucket("soak")
            root = f"{tmp}/soak" if server is None else "s3://soak"
            for name in ("tubingen.jpg", "starry_night.jpg"):
                storage.write_bytes(f"{root}/in/{name}", (SAMPLES / name).read_bytes())
            rows = ["id,content_uri,style_uri,seed,init"]
            rows += [f"i{i},{root}/in/tubingen.jpg,{root}/in/starry_night.jpg,{i},noise" for i in range(args.items)]
            storage.write_bytes(f"{root}/m.csv", ("\n".join(rows) + "\n").encode())
            sampler = Sampler(args.tracemalloc, args.count_objects, args.sample)
            start = time.time()
            if args.json:
                sampler.checkpoint = lambda: write_json(args.json, figures_so_far(sampler, start, args, baseline_per_item, engine_seconds[0]))
            sampler.start()
            with listening(sampler.on_progress):
                state = stylize_manifest(
                    manifest_uri=f"{root}/m.csv", output_uri=f"{root}/out",
                    defaults=StyleParams(size=args.size, iterations=args.iterations, weights="random:0", tolerance=0),
                    allow_local_paths=server is None, return_state=True,
                )  # fmt: skip
            sampler.stop.set()
            sampler.join()
            summary = state.result()
        finally:
            if server:
                server.stop()
    figures = figures_so_far(sampler, start, args, baseline_per_item, engine_seconds[0], summary)
    if args.tracemalloc:
        half = start + (sampler.samples[-1][0] - start) / 2
        traced_half = [(_done_at(sampler, t), m) for t, m in sampler.traced if t >= half]
        figures["python_heap_growth_mb_per_1000_items"] = _slope([d for d, _ in traced_half], [m for _, m in traced_half]) * 1000
        after_warmup = [snap for t, snap in sampler.snapshots if t >= start + (sampler.samples[-1][0] - start) / 4]
        if len(after_warmup) >= 2:
            print("\n".join(heap_growth(after_warmup[0], after_warmup[-1])))
    print("\n".join(figures.get("grew_most_per_1000_items", [])))
    for key, value in figures.items():
        if isinstance(value, list | dict):
            continue
        print(f"{key:<36} {value:.3f}" if isinstance(value, float) else f"{key:<36} {value}")
    if args.json:
        write_json(args.json, figures)
    return 0


def figures_so_far(sampler: Sampler, start: float, args: argparse.Namespace, baseline_per_item: float, engine_s: float,
                   summary: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The soak's figures from the samples so far (``summary``: the finished run's, None while it runs).

    The RSS growth is a least-squares slope of the flow process's RSS against rows finished, over the
    samples after the first half of the rows reached (the warm-up: the heap, caches and thread pools
    settling); ``rss_by_1000_items`` is the RSS when each further 1,000 rows had finished."""
    samples = list(zip(sampler.samples, sampler.progress, strict=False))
    now = samples[-1][0][0] if samples else time.time()
    done = summary["counts"]["succeeded"] if summary else (samples[-1][1][1] if samples else 0)
    wall = summary["wall_time_s"] if summary else now - start
    reached = samples[-1][1][1] if samples else 0
    # Growth per item is measured while rows still finish: once the last has, the flow writes the final
    # tables, summary and report (a one-off cost of the run's end, reported on its own as finish_rss_rise_mb).
    after_warmup = [(d, m) for (_, m, _), (_, d, _) in samples if reached / 2 <= d < args.items]
    running = [m for (_, m, _), (_, d, _) in samples if d < args.items]
    finishing = [m for (_, m, _), (_, d, _) in samples if d >= args.items]
    by_thousand: dict[int, float] = {}
    for (_, m, _), (_, d, _) in samples:
        by_thousand.setdefault(d // 1000 * 1000, m)
    load = os.getloadavg()
    counts = [(t, c) for t, c in list(sampler.counts) if t >= start + (now - start) / 4]  # after warm-up
    grown: dict[str, Any] = {}
    if len(counts) >= 2:
        (t0, first), (t1, last) = counts[0], counts[-1]
        per = 1000 / max(1, _done_at(sampler, t1) - _done_at(sampler, t0))
        grown = {"live_objects_growth_per_1000_items": (sum(last.values()) - sum(first.values())) * per,
                 "grew_most_per_1000_items": count_growth(first, last, per)}  # fmt: skip
    return grown | {
        "items": args.items, "finished": summary is not None, "rows_reached": reached, "succeeded": done,
        "wall_s": wall, "items_per_minute": 60 * reached / max(wall, 1e-9),
        "engine_s": engine_s, "engine_alone_per_item_s": baseline_per_item,
        "flow_wall_per_item_s": wall / max(reached, 1), "flow_overhead_per_item_s": wall / max(reached, 1) - baseline_per_item,
        "wall_minus_engine_per_item_s": (wall - engine_s) / max(reached, 1),
        "peak_flow_rss_mb": max((m for _, m, _ in sampler.samples), default=0.0),
        "peak_prefect_server_rss_mb": max((c for _, _, c in sampler.samples), default=0.0),
        "flow_rss_growth_mb_per_1000_items": _slope([d for d, _ in after_warmup], [m for _, m in after_warmup]) * 1000,
        "growth_measured_from_rows": min((d for d, _ in after_warmup), default=0),
        "finish_rss_rise_mb": max(finishing) - running[-1] if finishing and running else None,
        "peak_events_backlog": max((b for _, _, b in sampler.progress), default=0),
        "load_average_1_5_15": [round(x, 2) for x in load], "cpu_count": os.cpu_count(),
        "storage": "local" if args.local else "s3", "sample_every_s": args.sample,
        "rss_by_1000_items_mb": {str(k): round(v, 1) for k, v in sorted(by_thousand.items())},
        "samples_t_rows_rss_mb_backlog": [[round(t - start, 1), d, round(m, 1), b] for (t, m, _), (_, d, b) in samples[:: max(1, len(samples) // 400)]],
    }  # fmt: skip


def write_json(path: str, figures: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")


def _done_at(sampler: Sampler, t: float) -> int:
    """Rows finished at time ``t`` (the last progress sample not after it)."""
    return max((d for s, d, _ in sampler.progress if s <= t), default=0)


def baseline_in_a_fresh_process(size: int, iterations: int, count: int) -> float:
    """:func:`engine_baseline` in a child process: PyTorch run on this process's main thread would keep an
    OpenMP team alive and slow the flow's device thread (see nst_run.execute.DevicePool)."""
    code = f"import soak; print(soak.engine_baseline({size}, {iterations}, {count}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def engine_baseline(size: int, iterations: int, count: int) -> float:
    """Seconds per item for the same items through the engine alone, one after another (no Prefect, no S3)."""
    from nst_core import images, stylize
    from nst_core.network import load_network
    from nst_core.params import StyleParams

    content = images.load_image(SAMPLES / "tubingen.jpg")
    style = images.load_image(SAMPLES / "starry_night.jpg")
    network = load_network("random:0", device="cpu")
    params = [StyleParams(size=size, iterations=iterations, weights="random:0", tolerance=0, seed=i, init="noise") for i in range(count + 5)]
    for p in params[:5]:  # warm-up
        stylize(content, style, p, network=network)
    start = time.perf_counter()
    for p in params[5:]:
        stylize(content, style, p, network=network)
    return (time.perf_counter() - start) / count


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


if __name__ == "__main__":
    sys.exit(main())
