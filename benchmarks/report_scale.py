"""The run report at scale: build time, peak memory, file sizes and Chromium's time to show, sort and filter.

    .venv/bin/python benchmarks/report_scale.py                           # baseline at 10,000; this code at 10,000 and 100,000
    .venv/bin/python benchmarks/report_scale.py --rows 2000 --baseline-rows 2000 --json /tmp/r.json
    .venv/bin/python benchmarks/report_scale.py --memory-rows 5000 20000 40000 --json benchmarks/results/report-memory.json

A finished run is fabricated in the stored layout the flow writes
(``runs/{run}/results.parquet`` + ``results.csv`` + ``summary.json``,
``items/{id}/meta.json`` + ``loss.csv``, an output image in one item folder
of every ``--image-every``; the others get the report's placeholders), then
the report is built in a child process (its wall time and peak RSS, the
child's own ``VmHWM``), the largest file it wrote is measured, and headless Chromium
(Debian's ``/usr/bin/chromium`` through Playwright) opens it from ``file://``:

* ``show_s``: from navigation until the first card and the total row count are on screen;
* ``sort_s``: sorting by loss total until the row with the lowest loss (the last succeeded row) is the first card;
* ``sort_scattered_s``: sorting by style distance until the 48th card is the 48th row by it (those rows
  are spread over the whole run: a page of cards is loaded for almost each);
* ``filter_s``: searching one id of the last row until it is the only card shown.

The baseline is the report as it was before it was paged (``--baseline-ref``,
its ``nst_run/report`` taken from git into a temporary package), measured in
the same run on the same fabricated run. Times are wall-clock on a shared
machine: compare the ratios, not the absolute figures.

``--memory-rows``: the build's peak RSS against the row count instead (no
browser). One run of the largest count is fabricated; each count's run is a
run folder beside it whose results table holds that many first rows (the
items are the same files), so only the build differs. The figure is the slope
of peak RSS per 1,000 rows (least squares over the counts, and between
neighbours), beside the RSS of a child that only imports the report; the
code of ``--memory-baseline-ref`` is measured in the same run on the same
folders (its own ``nst_run/report``; the rest of the tree, the results reader
included, is this one's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fabricate import expected, fabricate  # noqa: E402 - tests/fabricate.py, shared with the report tests

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update"]
BASELINE_REF = "f452bfb"  # the report before paging (one page, every card inline)
MEMORY_BASELINE_REF = "2974512"  # the paged report before its build's memory was made flat


def baseline_package(ref: str, dest: Path) -> Path:
    """``nst_run/report`` at git ``ref`` as the package ``nst_report_baseline`` under ``dest``."""
    package = dest / "nst_report_baseline"
    listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", ref, "nst_run/report"], check=True, capture_output=True, text=True)
    for name in listing.stdout.split():
        target = package / Path(name).relative_to("nst_run/report")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{name}"], check=True, capture_output=True).stdout)
    return dest


def build_in_child(module: str, run: Path, extra_path: Path | None, timeout_s: float, code: str = "m.build_report(sys.argv[1])") -> dict[str, float]:
    """Build the report in a child process (``code``, with the module as ``m``); its wall time and peak RSS.

    The peak is the child's own ``VmHWM`` (``/proc/self/status``) as it ends, not ``wait4``'s ru_maxrss:
    Linux counts in ru_maxrss the RSS the child had before its ``exec``, a copy of this (large, after
    fabricating) process's, so that figure is never below this process's RSS at the time.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (extra_path, REPO) if p)}
    report = "open(sys.argv[2], 'w').write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])"
    code = f"import {module} as m, sys; {code}; {report}"
    with tempfile.NamedTemporaryFile(prefix="nst-report-peak-") as peak:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", code, str(run), peak.name], env=env)
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise TimeoutError(f"{module}: build over {timeout_s} s") from None
        wall = time.perf_counter() - start
        if child.returncode != 0:
            raise RuntimeError(f"{module}: build failed (exit {child.returncode})")
        peak_kib = int(Path(peak.name).read_text())
    return {"build_s": round(wall, 2), "peak_rss_mb": round(peak_kib / 1024, 1)}


def written_files(run: Path) -> dict[str, float]:
    """The report's own files (page, data scripts; thumbnails apart): count and largest."""
    files = [run / "report.html", *sorted((run / "report-files").glob("*"))] if (run / "report-files").is_dir() else [run / "report.html"]
    sizes = {f.name: f.stat().st_size for f in files}
    thumbs = [f.stat().st_size for f in (run / "thumbs").glob("*")]
    biggest = max(sizes, key=sizes.__getitem__)
    return {
        "report_html_mb": round(sizes["report.html"] / 1e6, 2), "files": len(sizes), "largest_file": biggest,
        "largest_file_mb": round(sizes[biggest] / 1e6, 2), "all_files_mb": round(sum(sizes.values()) / 1e6, 1),
        "thumbs": len(thumbs), "largest_thumb_kb": round(max(thumbs, default=0) / 1e3, 1),
    }  # fmt: skip


def browse(report: Path, rows: int, timeout_s: float) -> dict[str, float | None]:
    """Chromium's time to first show, to sort by loss and to filter by one id (each until it is on screen)."""
    from playwright.sync_api import sync_playwright

    want = expected(rows)
    first_id = "(() => { const h = document.querySelector('#cards article.card:not([hidden]) h2.id'); return h && h.textContent; })()"
    timings: dict[str, float | None] = {"show_s": None, "sort_s": None, "sort_scattered_s": None, "filter_s": None}
    nth_id = "(n => { const h = document.querySelectorAll('#cards article.card:not([hidden]) h2.id')[n - 1]; return h && h.textContent; })"
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000}, offline=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_s * 1000)
            start = time.perf_counter()
            page.goto(report.as_uri(), wait_until="commit", timeout=timeout_s * 1000)
            page.wait_for_function(
                "n => { const c = document.querySelector('#cards article.card'); const s = document.getElementById('shown');"
                " return c && c.getBoundingClientRect().height > 0 && s && s.textContent.replace(/[^0-9 ]/g, '').split(' ').includes(String(n)); }",
                arg=rows, timeout=timeout_s * 1000, polling=50,
            )  # fmt: skip
            timings["show_s"] = round(time.perf_counter() - start, 2)
            page.wait_for_function("() => !document.getElementById('sort').disabled", timeout=timeout_s * 1000, polling=50)
            start = time.perf_counter()
            page.select_option("#sort", "loss")
            page.wait_for_function(f"id => {first_id} === id", arg=want["lowest_loss"], timeout=timeout_s * 1000, polling=20)
            timings["sort_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            page.select_option("#sort", "sd")
            page.wait_for_function(f"id => {nth_id}(48) === id", arg=want["by_sd"], timeout=timeout_s * 1000, polling=20)
            timings["sort_scattered_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            page.fill("#f-q", want["last"])
            page.wait_for_function(
                f"id => {first_id} === id && document.querySelectorAll('#cards article.card:not([hidden])').length === 1",
                arg=want["last"], timeout=timeout_s * 1000, polling=20,
            )  # fmt: skip
            timings["filter_s"] = round(time.perf_counter() - start, 2)
        except Exception as exc:  # noqa: BLE001 - a timeout is a figure too
            timings["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"  # type: ignore[assignment]
        finally:
            browser.close()
    return timings


def measure(label: str, module: str, rows: int, root: Path, extra_path: Path | None, args: argparse.Namespace) -> dict[str, object]:
    start = time.perf_counter()
    run = fabricate(root / f"{label}-{rows}", rows, image_every=args.image_every, iterations=args.iterations)
    made = round(time.perf_counter() - start, 1)
    print(f"[{label} {rows}] fabricated in {made} s", flush=True)
    result: dict[str, object] = {"code": label, "rows": rows, "fabricate_s": made}
    result.update(build_in_child(module, run, extra_path, args.build_timeout))
    result.update(written_files(run))
    print(f"[{label} {rows}] {result}", flush=True)
    result.update(browse(run / "report.html", rows, args.browser_timeout))
    print(f"[{label} {rows}] {result}", flush=True)
    return result


def first_rows_runs(run: Path, counts: list[int]) -> dict[int, Path]:
    """Run folders beside ``run`` whose results table (and summary) hold its first ``n`` rows, for each ``n``."""
    import pandas as pd

    from nst_run import paths
    from nst_run.results import csv_bytes, parquet_bytes

    frame = pd.read_parquet(run / paths.RESULTS_PARQUET)
    summary = json.loads((run / paths.SUMMARY_FILE).read_text())
    folders = {}
    for n in counts:
        folder = run.parent / f"first-{n}"
        folder.mkdir()
        part = frame.iloc[:n]
        (folder / paths.RESULTS_PARQUET).write_bytes(parquet_bytes(part))
        (folder / paths.RESULTS_CSV).write_bytes(csv_bytes(part))
        counts_of = part["status"].value_counts().to_dict()
        (folder / paths.SUMMARY_FILE).write_text(json.dumps({**summary, "run": folder.name, "wall_time_s": n * 0.5, "counts": counts_of}))
        folders[n] = folder
    return folders


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (rows, MB) points, in MB per 1,000 rows."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    den = sum((x - mean_x) ** 2 for x, _ in points)
    return round(1000 * sum((x - mean_x) * (y - mean_y) for x, y in points) / den, 3) if den else 0.0


def memory_curve(args: argparse.Namespace) -> dict[str, object]:
    """Peak RSS of the build at each of ``args.memory_rows`` (this code, and the baseline's at the counts it is given)."""
    counts = sorted(set(args.memory_rows))
    with tempfile.TemporaryDirectory(prefix="nst-report-memory-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        run = fabricate(root / "run", counts[-1], image_every=args.image_every, iterations=args.iterations)
        print(f"[memory] fabricated {counts[-1]} rows in {time.perf_counter() - start:.1f} s", flush=True)
        folders = first_rows_runs(run, counts)
        codes: list[tuple[str, str, Path | None, list[int]]] = [("this", "nst_run.report", None, counts)]
        if args.memory_baseline_ref:
            baseline = baseline_package(args.memory_baseline_ref, root / "baseline-code")
            codes.append(("baseline", "nst_report_baseline", baseline, [n for n in counts if n <= args.memory_baseline_max]))
        curves: dict[str, object] = {}
        for label, module, extra, sizes in codes:
            imports = build_in_child(module, run, extra, args.build_timeout, code="pass")["peak_rss_mb"]
            points = []
            for n in sizes:
                for sub in ("thumbs", "report-files"):
                    subprocess.run(["rm", "-rf", str(folders[n] / sub)], check=False)
                figures = build_in_child(module, folders[n], extra, args.build_timeout)
                points.append({"rows": n, **figures})
                print(f"[memory {label}] {points[-1]}", flush=True)
            xy = [(int(p["rows"]), float(p["peak_rss_mb"])) for p in points]
            curves[label] = {
                "imports_rss_mb": imports, "points": points,
                "slope_mb_per_1000_rows": slope_per_1000(xy) if len(xy) > 1 else None,
                "slope_past_first_mb_per_1000_rows": slope_per_1000(xy[1:]) if len(xy) > 2 else None,
                "slopes_between_neighbours": [
                    {"rows": f"{a[0]}-{b[0]}", "mb_per_1000_rows": round(1000 * (b[1] - a[1]) / (b[0] - a[0]), 3)} for a, b in zip(xy, xy[1:])
                ],
            }  # fmt: skip
    return {"baseline_ref": args.memory_baseline_ref, "cpu_count": os.cpu_count(), "curves": curves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000], help="row counts for this code")
    parser.add_argument("--baseline-rows", type=int, default=10_000, help="row count for the baseline (0: none)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the baseline report")
    parser.add_argument("--image-every", type=int, default=10, help="an output image in one item of every N (the rest: placeholders)")
    parser.add_argument("--iterations", type=int, default=100, help="loss.csv rows per item")
    parser.add_argument("--build-timeout", type=float, default=1800)
    parser.add_argument("--browser-timeout", type=float, default=240)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--memory-rows", type=int, nargs="*", help="measure the build's peak RSS at these row counts instead (no browser)")
    parser.add_argument("--memory-baseline-ref", default=MEMORY_BASELINE_REF, help="git ref of the code --memory-rows compares with ('': none)")
    parser.add_argument("--memory-baseline-max", type=int, default=40_000, help="the baseline is measured up to this row count")
    args = parser.parse_args()
    if args.memory_rows:
        figures = memory_curve(args)
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="nst-report-scale-") as tmp:
        root = Path(tmp)
        if args.baseline_rows:
            baseline = baseline_package(args.baseline_ref, root / "baseline-code")
            results.append(measure("baseline", "nst_report_baseline", args.baseline_rows, root, baseline, args))
        for rows in args.rows:
            results.append(measure("paged", "nst_run.report", rows, root, None, args))
            subprocess.run(["rm", "-rf", str(root / f"paged-{rows}")], check=False)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"baseline_ref": args.baseline_ref, "cpu_count": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
