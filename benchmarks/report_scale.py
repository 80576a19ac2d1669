"""The run report at scale: build time, peak memory, file sizes and Chromium's time to show, sort and filter.

    .venv/bin/python benchmarks/report_scale.py                           # baseline at 10,000; this code at 10,000 and 100,000
    .venv/bin/python benchmarks/report_scale.py --rows 2000 --baseline-rows 2000 --json /tmp/r.json

A finished run is fabricated in the stored layout the flow writes
(``runs/{run}/results.parquet`` + ``results.csv`` + ``summary.json``,
``items/{id}/meta.json`` + ``loss.csv``, an output image in one item folder
of every ``--image-every``; the others get the report's placeholders), then
the report is built in a child process (its wall time and peak RSS, from
``wait4``), the largest file it wrote is measured, and headless Chromium
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


def baseline_package(ref: str, dest: Path) -> Path:
    """``nst_run/report`` at git ``ref`` as the package ``nst_report_baseline`` under ``dest``."""
    package = dest / "nst_report_baseline"
    listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", ref, "nst_run/report"], check=True, capture_output=True, text=True)
    for name in listing.stdout.split():
        target = package / Path(name).relative_to("nst_run/report")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{name}"], check=True, capture_output=True).stdout)
    return dest


def build_in_child(module: str, run: Path, extra_path: Path | None, timeout_s: float) -> dict[str, float]:
    """Build the report in a child process; its wall time and peak RSS (``wait4``'s ru_maxrss)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (extra_path, REPO) if p)}
    code = f"import {module} as m, sys; m.build_report(sys.argv[1])"
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(run)], env=env)
    deadline = start + timeout_s
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            child.kill()
            pid, status, usage = os.wait4(child.pid, 0)
            raise TimeoutError(f"{module}: build over {timeout_s} s")
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{module}: build failed ({status})")
    return {"build_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


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
    args = parser.parse_args()
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
