"""``nst run``, ``nst validate`` and ``nst demo``: the commands that use the Prefect flow."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

from nst_cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, build_params
from nst_run.status import ALWAYS_SHOWN_STATUSES

if TYPE_CHECKING:
    from flows.progress import Progress

# Seconds per iteration at 512 px with L-BFGS, for the plan's device-hours estimate
# (measured: see README, benchmarks/engine.py). Scales with pixel count.
SECONDS_PER_ITERATION_512 = {"cpu": 4.0, "cuda": 0.03}



def _quiet_prefect_env() -> None:
    """Defaults for running the flow on Prefect's ephemeral server on a small machine."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


STOP_GRACE_S = 10.0  # after a first signal, how long the orderly stop may take before it is cut short
_stopping = threading.Event()


def _stop_cleanly(signum: int, frame: Any) -> None:
    """A first SIGINT, SIGTERM or SIGHUP stops the run as Ctrl-C does; a second one (or ``STOP_GRACE_S``) at once.

    SIGTERM's and SIGHUP's default action killed the process on the spot, leaving Prefect's
    temporary server (a child process stopped only at interpreter exit) running without a
    parent. The orderly stop (KeyboardInterrupt) waits for the task threads, i.e. for the
    optimisation in progress; a second Ctrl-C during it used to break the interpreter's exit
    ("can't register atexit after shutdown", once per thread). Now a second signal, or the
    grace period running out, stops the temporary server and exits at once (128 + signal);
    leases left behind expire by their TTL, as after a crash.
    """
    if _stopping.is_set():
        _stop_now(signum)
    _stopping.set()
    print(f"nst: {signal.Signals(signum).name}: stopping (a second signal stops at once)", file=sys.stderr, flush=True)
    threading.Thread(target=_stop_after_grace, args=(signum,), name="nst-stop-grace", daemon=True).start()
    raise KeyboardInterrupt


def _stop_after_grace(signum: int) -> None:
    time.sleep(STOP_GRACE_S)
    _stop_now(signum)


def _stop_now(signum: int) -> None:
    """Stop Prefect's temporary server (if this process started one) and exit without waiting for threads."""
    try:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            with contextlib.suppress(Exception):
                server.stop()
    except Exception:  # noqa: BLE001 - stopping must not fail on Prefect's internals
        pass
    print(f"nst: stopped ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
    os._exit(128 + signum)


@contextlib.contextmanager
def _stopped_cleanly_by_signals() -> Iterator[None]:
    """While the flow runs (in the main thread): SIGINT, SIGTERM and SIGHUP go to :func:`_stop_cleanly`.

    The handlers stay installed after an interrupt, so that the interpreter's exit (which stops
    Prefect's temporary server) is not cut short; otherwise the previous ones are put back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _stop_cleanly) for s in _STOP_SIGNALS}
    yield  # an exception (KeyboardInterrupt) leaves the handlers (or SIG_IGN) in place
    for stop_signal, handler in previous.items():
        signal.signal(stop_signal, handler)


def _refuse_a_file_for_a_folder(output: str) -> None:
    """A local output folder that is a file (or lies under one) is refused before a Prefect server starts.

    Raises:
        UsageError: ``output`` or one of its parents is a file.
    """
    from nst_core import storage

    if not storage.is_local(output):
        return
    folder = storage.parse_uri(output).path
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == folder else f"lies under {path}, a file"
                raise UsageError(f"output {storage.sanitize_uri(output)}: {where}, not a folder")
            return


def _tables_stored(failed_uri: str) -> str:
    """``; results stored: {run folder}/results.csv`` when the write that failed lies in a run folder whose table is stored."""
    from nst_core import storage
    from nst_run import paths

    output_root, found, rest = failed_uri.partition(f"/{paths.RUNS_DIR}/")
    run = rest.split("/", 1)[0]
    table = paths.run_file(paths.run_folder(output_root, run), paths.RESULTS_CSV) if found and run else None
    return f"; results stored: {table}" if table and storage.exists(table) else ""


class _WithoutTraceback(logging.Filter):
    """Leaves out the traceback of a record whose exception is one of ``explained`` (it still says what failed)."""

    def __init__(self, explained: tuple[type[BaseException], ...]):
        super().__init__()
        self.explained = explained

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.explained):
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def _tracebacks_left_out(explained: tuple[type[BaseException], ...]) -> Iterator[None]:
    """While the flow runs: the terminal's log lines (the root logger's handlers, where Prefect's console
    handler sits) carry no traceback for the errors nst explains in one line after the run. Prefect's API
    handlers (the UI's logs) sit on Prefect's own loggers and see each record first, traceback included."""
    handlers = list(logging.getLogger().handlers)
    quiet = _WithoutTraceback(explained)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _defaults(sets: dict[str, str]):
    return build_params(sets)


def estimate_device_hours(rows: list[Any], device: str) -> float:
    per_it = SECONDS_PER_ITERATION_512["cuda" if device.startswith("cuda") else "cpu"]
    seconds = sum(per_it * (r.params.size / 512) ** 2 * r.params.iterations for r in rows)
    return seconds / 3600.0


def validate_manifest(args: argparse.Namespace, sets: dict[str, str]) -> int:
    """The plan, without running: valid, invalid (with reasons), cached, to do, styles, device-hours."""
    import torch

    from nst_core import storage
    from nst_run.manifest import load_manifest
    from nst_run.planning import Outcome, Work, resolve_items

    defaults = _defaults(sets)
    manifest = load_manifest(args.manifest, defaults=defaults, allow_local_paths=not args.no_local_paths)
    cached = 0
    failed: list[Outcome] = []
    todo: list[Work] = []
    if args.output:
        resolved = resolve_items(manifest.rows, args.output, False)
        todo = [r for r in resolved if isinstance(r, Work)]
        cached = sum(1 for r in resolved if isinstance(r, Outcome) and r.status == "cached")
        failed = [r for r in resolved if isinstance(r, Outcome) and r.status == "failed"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows_todo = [w.row for w in todo] if args.output else manifest.rows
    plan = {
        "manifest": storage.sanitize_uri(args.manifest),
        "rows": manifest.total,
        "valid": len(manifest.rows),
        "invalid": len(manifest.invalid),
        "cached": cached if args.output else None,
        "unreadable": len(failed) if args.output else None,
        "to_do": len({w.item_id for w in todo}) if args.output else len(manifest.rows),
        "distinct_styles": len({r.style_uri for r in manifest.rows}),
        "estimated_device_hours": round(estimate_device_hours(rows_todo, device), 4),
        "estimate_device": device,
        "invalid_rows": [{"row": b.row, "id": b.id, "column": b.column, "reason": b.reason} for b in manifest.invalid],
        "unreadable_rows": [{"row": f.row, "id": f.id, "reason": f.error} for f in failed],
    }
    if args.output is None:
        plan["note"] = "inputs not checked: pass --output to read and hash every input and count items already done"
    if args.json:  # the plan alone on stdout, for scripts
        print(json.dumps(plan, indent=2))
    else:
        print(f"manifest {plan['manifest']}: {plan['rows']} rows, {plan['valid']} valid, {plan['invalid']} invalid")
        for bad in manifest.invalid:
            print(f"  invalid: {bad.error}")
        if args.output:
            print(f"  already done (cached): {cached}; unreadable inputs: {len(failed)}; to do: {plan['to_do']} items")
            for f in failed:
                print(f"  unreadable: row {f.row}: {f.error}")
        else:
            print(f"  {plan['note']}")
        print(f"  distinct styles: {plan['distinct_styles']}; estimated {plan['estimated_device_hours']:.3f} device-hours on {device}")
    # Any invalid row or unreadable input is a plan that would fail: a script can stop on the exit code.
    return EXIT_FAILED if manifest.invalid or failed else EXIT_OK


class ProgressLine:
    """``rows 12/40 done, 1 failed, ETA 0:03:10`` on ``stream`` as batches finish (``flows.progress``).

    On a terminal the line is rewritten in place; elsewhere (a log, CI) a line is printed each time
    another tenth of the rows is done, so a 100,000-row run writes ten lines, not 100,000.
    """

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = -1  # the last tenth printed (not a terminal)
        self.last = (-1, -1)

    def __call__(self, progress: Progress) -> None:
        if (progress.done, progress.failed) == self.last:
            return
        self.last = (progress.done, progress.failed)
        tenth = 10 * progress.done // max(progress.total, 1)
        if not self.tty and tenth == self.shown:
            return
        self.shown = tenth
        eta = progress.eta_s
        line = f"rows {progress.done}/{progress.total} done, {progress.failed} failed, {progress.invalid} invalid"
        line += f", ETA {datetime.timedelta(seconds=round(eta))}" if eta else ""
        if self.tty:
            end = "\n" if progress.done >= progress.total else ""
            self.stream.write(f"\r\033[K{line}{end}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def print_summary(summary: dict[str, Any], outcomes_csv: str | None = None) -> None:
    counts = {k: n for k, n in summary["counts"].items() if n or k in ALWAYS_SHOWN_STATUSES}
    width = max(len(k) for k in counts)
    print(f"run {summary['run']}: {summary['rows']} rows in {summary['wall_time_s']:.1f} s")
    for status, n in counts.items():
        print(f"  {status:<{width}}  {n}")
    failures = summary.get("first_failures") or []
    if failures:
        shown = sum(n for status, n in summary["counts"].items() if status in ("failed", "invalid"))
        print(f"first failed and invalid rows ({len(failures)} of {shown}; all in results.csv):")
        for f in failures:
            print(f"  row {f['row']} ({f['id']}) {f['status']}: {f['error']}")
    print(f"results: {summary['results_csv']}")
    print(f"         {summary['results_parquet']}")
    if summary.get("report"):
        print(f"report:  {summary['report']}")
    print(f"items:   {summary['output_uri'].rstrip('/')}/items/<item_id>/ (stylized image, loss.csv, loss.png, meta.json)")
    if summary.get("random_weights"):
        print("WARNING: untrained random VGG-19 weights (random:N) were used; every output records this.")


def _run_flow(
    manifest: str, output: str, defaults, *, strict: bool, force: bool, max_items: int | None, allow_local_paths: bool, **options: Any
) -> tuple[int, dict[str, Any] | None]:
    _quiet_prefect_env()
    from flows.progress import listening
    from flows.stylize_manifest import stylize_manifest
    from nst_core.storage import NoSpace, StorageError
    from nst_run.manifest import ManifestError

    parameters = dict(
        manifest_uri=manifest, output_uri=output, defaults=defaults, strict=strict, force=force,
        max_items=max_items, allow_local_paths=allow_local_paths, **options,
    )  # fmt: skip
    flow_logger = logging.getLogger("prefect.flows")  # it would log the whole parameter dump as an error
    try:  # refused here, before a Prefect server starts, with the flag named
        flow_logger.disabled = True
        stylize_manifest.validate_parameters(parameters)
    except Exception as exc:
        lines = [line.strip(" -") for line in str(exc).splitlines()[1:] if line.strip()]
        raise UsageError("invalid run option: " + "; ".join("--" + line.replace("_", "-", line.find(":")) if ":" in line else line for line in lines)) from None
    finally:
        flow_logger.disabled = False
    _refuse_a_file_for_a_folder(output)
    explained = (ManifestError, StorageError, ValueError)  # the flow's errors nst turns into its one clear line
    with _stopped_cleanly_by_signals(), listening(ProgressLine(sys.stderr)), _tracebacks_left_out(explained):
        state = stylize_manifest(**parameters, return_state=True)
    try:
        summary = state.result(raise_on_failure=False)
    except Exception as exc:  # pragma: no cover - defensive
        summary = exc
    if isinstance(summary, NoSpace):  # the disk's fault, not the input's: exit 1, saying what was stored
        print(f"nst: error: the run stopped, storage full: {summary}{_tables_stored(summary.uri)}", file=sys.stderr)
        return EXIT_FAILED, None
    if isinstance(summary, explained):
        raise UsageError(str(summary))
    if isinstance(summary, BaseException):
        print(f"nst: error: the run failed: {summary}", file=sys.stderr)
        return EXIT_FAILED, None
    if not isinstance(summary, dict):
        print(f"nst: error: the run ended {state.type.value}: {state.message}", file=sys.stderr)
        return EXIT_FAILED, None
    counts = summary["counts"]
    code = EXIT_OK if counts["failed"] == 0 and counts["invalid"] == 0 else EXIT_FAILED
    return code, summary


# Flow parameters `nst run` exposes as flags (--batch-size ...); unset flags keep the flow's defaults.
RUN_OPTIONS = {
    "batch_size": (int, "items optimised together when size and parameters match (0 = automatic)"),
    "chunk_size": (int, "rows resolved and submitted together"),
    "item_timeout_s": (float, "fail an item whose optimisation runs longer than this"),
    "retries": (int, "task retries on transient storage errors"),
    "retry_delay_s": (float, "delay before the first retry (doubling after)"),
    "storage_patience_s": (float, "how long the run's own result writes wait for storage"),
    "lease_ttl_s": (float, "how long an item's lease outlives a dead worker"),
    "lease_wait_s": (float, "how long to wait for items another run is computing"),
}


def run_manifest(args: argparse.Namespace, sets: dict[str, str]) -> int:
    defaults = _defaults(sets)
    code, summary = _run_flow(
        args.manifest, args.output, defaults,
        strict=args.strict, force=args.force, max_items=args.max_items, allow_local_paths=not args.no_local_paths,
        **{name: getattr(args, name) for name in RUN_OPTIONS if getattr(args, name) is not None},
    )  # fmt: skip
    if summary is not None:
        print_summary(summary)
    return code


def demo(args: argparse.Namespace) -> int:
    """The README's main job: the sample manifest, end to end, on the embedded defaults."""
    import nst_samples
    from nst_core.network import WeightsError, load_network

    try:  # the manifest ships beside the images in the package, so a wheel runs the demo too
        manifest = nst_samples.path(nst_samples.MANIFEST)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    weights = "imagenet"
    try:
        load_network("imagenet", device="cpu")
    except WeightsError as exc:
        weights = "random:0"
        bar = "!" * 78
        print(f"{bar}\n{exc}\nThe demo goes on with weights=random:0 (UNTRAINED): outputs show the pipeline, not\n"
              f"ImageNet-quality style transfer, and every output records this.\n{bar}", file=sys.stderr)  # fmt: skip
    defaults = build_params({"size": args.size, "iterations": args.iterations, "weights": weights})
    output = os.path.abspath(args.output)
    print(f"nst demo: {manifest.name} (4 pairs) at {args.size} px, {args.iterations} iterations, weights={weights}")
    code, summary = _run_flow(str(manifest), output, defaults, strict=False, force=False, max_items=None, allow_local_paths=True)
    if summary is None:
        return code
    print_summary(summary)
    print(f"stylised images and loss plots (loss.png) are in {output}/items/*/")
    return code


__all__ = ["EXIT_USAGE", "demo", "run_manifest", "validate_manifest"]
