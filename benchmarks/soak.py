"""Soak: many tiny items through the real flow against a local S3 server (not a CI test).

    .venv/bin/python benchmarks/soak.py                       # 2,000 items, 32 px, 5 iterations
    .venv/bin/python benchmarks/soak.py --items 200 --json benchmarks/results/soak-small.json

Reports items per minute, the flow's own overhead per item, peak memory (RSS)
of the flow process and of the Prefect server, and the flow process's memory
growth per 1,000 items (a least-squares slope over the second half of the run,
after warm-up).

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
import json
import os
import subprocess
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
    """Samples the RSS of this process and of its child processes (the Prefect server) every second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []  # (time, flow MB, children MB)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            me = os.getpid()
            self.samples.append((time.time(), rss_mb(me), sum(rss_mb(c) for c in children(me))))
            self.stop.wait(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240"), ("PREFECT_LOGGING_LEVEL", "WARNING")):  # fmt: skip
        os.environ.setdefault(name, value)
    from s3server import start_s3_server

    import nst_run.execute as task_module
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
    baseline_per_item = baseline_in_a_fresh_process(args.size, args.iterations, min(args.items, 100))
    with tempfile.TemporaryDirectory() as tmp:
        server = start_s3_server(Path(tmp) / "s3")
        try:
            os.environ.update(server.env())
            storage.reset_clients()
            server.create_bucket("soak")
            for name in ("tubingen.jpg", "starry_night.jpg"):
                storage.write_bytes(f"s3://soak/in/{name}", (SAMPLES / name).read_bytes())
            rows = ["id,content_uri,style_uri,seed,init"]
            rows += [f"i{i},s3://soak/in/tubingen.jpg,s3://soak/in/starry_night.jpg,{i},noise" for i in range(args.items)]
            storage.write_bytes("s3://soak/m.csv", ("\n".join(rows) + "\n").encode())
            sampler = Sampler()
            sampler.start()
            start = time.time()
            state = stylize_manifest(
                manifest_uri="s3://soak/m.csv", output_uri="s3://soak/out",
                defaults=StyleParams(size=args.size, iterations=args.iterations, weights="random:0", tolerance=0),
                return_state=True,
            )  # fmt: skip
            sampler.stop.set()
            sampler.join()
            summary = state.result()
        finally:
            server.stop()
    wall = summary["wall_time_s"]
    done = summary["counts"]["succeeded"]
    run_samples = [s for s in sampler.samples if s[0] >= start]
    second_half = run_samples[len(run_samples) // 2 :]
    slope = _slope([(t - start) * done / wall for t, _, _ in second_half], [m for _, m, _ in second_half])
    figures = {
        "items": args.items, "succeeded": done, "wall_s": wall, "items_per_minute": 60 * done / wall,
        "engine_s": engine_seconds[0], "engine_alone_per_item_s": baseline_per_item,
        "flow_wall_per_item_s": wall / max(done, 1), "flow_overhead_per_item_s": wall / max(done, 1) - baseline_per_item,
        "wall_minus_engine_per_item_s": (wall - engine_seconds[0]) / max(done, 1),
        "peak_flow_rss_mb": max(m for _, m, _ in sampler.samples),
        "peak_prefect_server_rss_mb": max(c for _, _, c in sampler.samples),
        "flow_rss_growth_mb_per_1000_items": slope * 1000,
    }  # fmt: skip
    for key, value in figures.items():
        print(f"{key:<36} {value:.3f}" if isinstance(value, float) else f"{key:<36} {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


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
