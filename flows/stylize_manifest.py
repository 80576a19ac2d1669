"""The flow data teams run: a CSV manifest in, stylised images, losses and metadata out.

Composition: read and validate the manifest, resolve rows to content-addressed
items chunk by chunk (two chunks ahead), plan units of compatible items, and keep
a sliding window of task runs in flight (``tasks.steps``): what the task runner
runs at once (in-process, plus one queued per device: :attr:`Capacity.window`), the next
submitted as any finishes, so no chunk waits for its slowest batch. Outcomes go to the results table (``nst_run.results``) as they
come, then the report and Prefect artifacts. The work itself is ``nst_run``'s
plain functions. Before each chunk is taken in, the flow waits for Prefect's events
worker to catch up (``flows.events.wait_for_delivery``), so what Prefect keeps per
task run until its events are sent stays bounded however long the run.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.tasks import exponential_backoff
from pydantic import Field

from flows import events
from flows.hooks import describe_parameters, notify_failure
from flows.progress import Progress, publish
from flows.retention import ThreadPoolRunner, forget_dead_results, forget_no_assets, forget_result
from nst_core import storage
from nst_core.params import StyleParams
from nst_run import paths
from nst_run.execute import DEVICES, FailedTasks, LeaseReleases
from nst_run.lease import DEFAULT_TTL_S
from nst_run.manifest import ManifestError
from nst_run.planning import (
    AUTO_MAX_ITEMS,
    CPU_UNIT_ITEMS,
    DispatchPace,
    ItemsInFlight,
    Outcome,
    Work,
    chunks,
    costliest_first,
    outcome_for_invalid,
    plan_units,
    rows_costliest_first,
)
from nst_run.results import ResultsWriter, run_name
from tasks.steps import build_run_report, device_limit_exists, read_manifest, resolve_items, stylize_items

TABLE_ARTIFACT_ROWS = 1000
FIRST_FAILURES = 10  # failed and invalid rows named in summary.json (and by `nst run`); all are in results.csv
SUMMARY_FAILURES = 50  # ... and in the run's summary artifact

DASK_ADDRESS_ENV = "NST_DASK_ADDRESS"  # tcp://scheduler:8786: run the tasks on that dask-distributed cluster
DASK_RESOURCE_ENV = "NST_DASK_RESOURCE"  # the worker resource one batch holds (default GPU; empty: none)


def task_runner_from_settings() -> Any:
    """The task runner: a dask-distributed cluster when NST_DASK_ADDRESS is set, else threads in this process."""
    address = os.environ.get(DASK_ADDRESS_ENV)
    if address:
        return on_dask(address).task_runner
    return ThreadPoolRunner(max_workers=int(os.environ.get("NST_THREADS", "8")))


def on_dask(address: str) -> Any:
    """This flow with its tasks sent to the dask-distributed scheduler at ``address``."""
    try:
        from flows.dask_runner import ImpureDaskTaskRunner
    except ImportError:  # an extra: workers and the flow's machine install it with nst-bulk[dask]
        raise RuntimeError(f"{DASK_ADDRESS_ENV}={address} needs prefect-dask: pip install 'nst-bulk[dask]'") from None

    return stylize_manifest.with_options(task_runner=ImpureDaskTaskRunner(address=address))  # type: ignore[arg-type]  # prefect-dask's runner is a TaskRunner of its own futures


def _is_dask(runner: object) -> bool:
    """Whether ``runner`` is prefect-dask's task runner or ours (:mod:`flows.dask_runner`), without importing prefect-dask."""
    return any(cls.__name__ == "DaskTaskRunner" for cls in type(runner).__mro__)


TASKS_PER_DEVICE_ENV = "NST_TASKS_PER_DEVICE"  # task runs one device serves at once on dask (default 3)
RESOLVE_AHEAD = 2  # chunks being resolved while earlier ones compute
DEVICE_LIMIT = os.environ.get("NST_GPU_LIMIT", "gpu")  # the global concurrency limit held around each optimisation, if it exists


def _tasks_per_device() -> int:
    return max(1, int(os.environ.get(TASKS_PER_DEVICE_ENV, "3")))


def _gpu_annotation() -> contextlib.AbstractContextManager[Any]:
    """On a dask runner, each unit holds a share of one unit of the workers' GPU resource (``--resources
    GPU=1``): ``1/NST_TASKS_PER_DEVICE``, so three tasks run on each device's worker at once: one
    optimises, one has fetched its inputs and waits for the device, one stores its outputs or fetches
    (the worker's DevicePool lends the device to one at a time). With two, the device waited whenever
    the next unit was still starting and fetching as the current one ended: 7 % of K=64's device time
    in ``benchmarks/fleet.py``, in the gaps between items."""
    context = FlowRunContext.get()
    resource = os.environ.get(DASK_RESOURCE_ENV, "GPU")
    if context is None or not resource or not _is_dask(context.task_runner):
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={resource: 1 / _tasks_per_device()})


@dataclass(frozen=True)
class Capacity:
    """What the flow's task runner can compute at once: ``devices`` (GPUs, or 1 CPU), ``tasks`` run at
    once, and whether every device is a CPU (known only in-process)."""

    devices: int
    tasks: int
    cpu_only: bool
    where: str
    binds_early: bool = False  # a task submitted is bound to a device at once (dask), not when it reaches one

    @property
    def window(self) -> int:
        """Task runs kept in flight: what runs at once (on dask three per device: one optimising, one
        waiting for the device with its inputs fetched, one storing or fetching). No more:
        a unit queued on a worker is bound to it, and with long-tailed item times early binding leaves
        some devices idle while others still hold a queue (measured at K=64: benchmarks/fleet.py).
        In-process a queued task waits for whichever device frees first, so one more per device is kept."""
        return self.tasks if self.binds_early else self.tasks + self.devices

    def describe(self) -> str:
        return f"{self.where}: {self.devices} device(s), {self.tasks} task(s) at once, up to {self.window} in flight"


def runner_capacity() -> Capacity:
    """The flow's task runner's :class:`Capacity`: this process's devices and threads, or the dask cluster's
    workers (their ``GPU`` resource and threads) as the scheduler knows them when the run starts."""
    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    if _is_dask(runner):
        resource = os.environ.get(DASK_RESOURCE_ENV, "GPU")
        workers = list(runner.client.scheduler_info(n_workers=-1)["workers"].values())  # type: ignore[union-attr]
        share = _tasks_per_device()
        devices = tasks = 0
        for worker in workers:
            held = int(worker.get("resources", {}).get(resource, 0)) if resource else 1
            devices += held
            tasks += min(int(worker.get("nthreads", 1)), held * share) if resource else int(worker.get("nthreads", 1))
        return Capacity(max(1, devices), max(1, tasks), False, f"dask ({len(workers)} workers)", binds_early=True)
    threads = int(getattr(runner, "_max_workers", 0) or os.environ.get("NST_THREADS", "8"))
    return Capacity(len(DEVICES.devices), max(1, threads), DEVICES.devices[0].type == "cpu", "this process")


class SlidingWindow:
    """Task futures in flight (at most ``size``) with the unit each computes; :meth:`next_done` returns
    whichever finishes first. Each future reports itself on a queue once (a done callback), so waiting
    costs nothing per future in flight."""

    def __init__(self, size: int):
        self.size = size
        self._units: dict[Any, list[Work]] = {}
        self._done: queue.Queue[Any] = queue.Queue()
        self._watched: set[int] = set()
        self._early: list[Any] = []  # other futures that finished while not waited for

    def __len__(self) -> int:
        return len(self._units)

    def has_room(self) -> bool:
        return len(self._units) < self.size

    def add(self, future: Any, unit: list[Work]) -> None:
        self._units[future] = unit
        self._watch(future)

    def _watch(self, future: Any) -> None:
        if id(future) not in self._watched:
            self._watched.add(id(future))
            future.add_done_callback(self._done.put)

    def next_done(self, also: Any = None) -> tuple[Any, list[Work]]:
        """The first of the window's futures, or ``also``, to finish, and its unit (empty for ``also``)."""
        if also is not None:
            if any(f is also for f in self._early):
                self._early = [f for f in self._early if f is not also]
                self._watched.discard(id(also))
                return also, []
            self._watch(also)
        while True:
            future = self._done.get()
            if future in self._units:
                self._watched.discard(id(future))
                return future, self._units.pop(future)
            if future is also:
                self._watched.discard(id(future))
                return future, []
            self._early.append(future)


RETRY_JITTER_FACTOR = 0.5  # each retry waits a random time around its delay (at most 1.5x): workers do not retry in step


def retry_delays(retries: int, first_delay_s: float, cap_s: float = 600.0) -> list[float]:
    """Delays before each task retry: Prefect's ``exponential_backoff`` from ``first_delay_s`` (doubling: a blip
    is retried soon, an outage waited out), each capped at ``cap_s``; tasks add ``RETRY_JITTER_FACTOR``."""
    return [min(delay, cap_s) for delay in exponential_backoff(backoff_factor=first_delay_s)(retries)]


def _check_output(output_uri: str, allow_local_paths: bool) -> None:
    parsed = storage.parse_uri(output_uri)  # refuses unsupported schemes
    if parsed.scheme != "s3" and not allow_local_paths:
        raise ManifestError(f"output_uri {output_uri!r}: local paths are refused (allow_local_paths is off)")


def _summary_markdown(summary: dict[str, Any], failures: list[Outcome]) -> str:
    counts = summary["counts"]
    lines = [
        f"# Stylize run `{summary['run']}`",
        "",
        f"- manifest: `{summary['manifest_uri']}`",
        f"- outputs: `{summary['run_folder']}`",
        f"- results: `{summary['run_folder']}/results.csv` (and `.parquet`)",
        *([f"- report: `{summary['report']}` (a static page with its thumbnails and data files beside it; `nst report {summary['run_folder']} --open` opens a local copy)"] if summary.get("report") else []),
        f"- rows: {summary['rows']}; " + ", ".join(f"{status} {n}" for status, n in counts.items()),
        f"- wall time: {summary['wall_time_s']:.1f} s",
    ]
    if summary.get("random_weights"):
        lines += ["", "**WARNING: untrained random VGG-19 weights were used (`random:N`); outputs are smoke-test quality.**"]
    if failures:
        lines += ["", f"## Failed and invalid rows (first {SUMMARY_FAILURES})", "", "| row | id | status | error |", "|---|---|---|---|"]
        for o in failures[:SUMMARY_FAILURES]:
            error = o.error.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {o.row} | {o.id} | {o.status} | {error} |")
    return "\n".join(lines)


@flow(
    name="stylize_manifest",
    description="Stylise every row of a CSV manifest (Gatys et al. 2015, VGG-19).",
    task_runner=task_runner_from_settings(),
    on_failure=[notify_failure],
    on_crashed=[notify_failure],
)
@describe_parameters
def stylize_manifest(
    manifest_uri: Annotated[str, Field(description="The manifest CSV: s3://bucket/key (or a local path when allowed).")],
    output_uri: Annotated[str, Field(description="Where outputs go: s3://bucket/prefix (or a local folder when allowed).")],
    defaults: Annotated[StyleParams, Field(description="Style parameters for every row; the manifest's own columns override them.")] = StyleParams(),
    strict: Annotated[bool, Field(description="Fail the run before any work when any row is invalid.")] = False,
    force: Annotated[bool, Field(description="Redo items that are already done.")] = False,
    max_items: Annotated[int | None, Field(ge=1, description="Only the first N manifest rows.")] = None,
    allow_local_paths: Annotated[bool, Field(description="Allow local paths (not only s3://) for the manifest, inputs and outputs.")] = False,
    item_timeout_s: Annotated[float, Field(gt=0, description="Fail an item whose optimisation runs longer than this.")] = 3600.0,
    batch_size: Annotated[int, Field(ge=0, le=256, description="Items optimised together when their size and parameters match; 0 = automatic (on a CPU the batch size measured cheapest per item, on CUDA from free GPU memory).")] = 0,
    chunk_size: Annotated[int, Field(ge=1, le=10_000, description="Rows resolved together (each chunk's inputs hashed in one task, two chunks ahead of the work) and written per results part.")] = 64,
    retries: Annotated[int, Field(ge=0, le=20, description="Task retries on transient storage errors (unreachable endpoint, timeouts, 5xx).")] = 5,
    retry_delay_s: Annotated[float, Field(ge=0, le=3600, description="Delay before the first task retry; each further retry waits twice as long (capped at 600 s), each delay varied at random by up to 50 % so workers do not retry in step.")] = 5.0,
    lease_ttl_s: Annotated[float, Field(ge=1, le=86_400, description="How long an item's lease outlives its worker's last heartbeat (a dead worker blocks its items this long; renewed every third of it).")] = DEFAULT_TTL_S,
    storage_patience_s: Annotated[float, Field(ge=0, le=86_400, description="How long the run's own writes (results tables, summary, report) keep retrying while storage is unreachable.")] = 300.0,
    lease_wait_s: Annotated[float, Field(ge=0, le=86_400, description="How long to wait for an item another run is computing before reporting it in_progress_elsewhere.")] = 600.0,
) -> Any:
    logger = get_run_logger()
    started = time.perf_counter()
    _check_output(output_uri, allow_local_paths)
    manifest = read_manifest(manifest_uri, defaults, allow_local_paths, max_items)
    if strict and manifest.invalid:
        first = "; ".join(bad.error for bad in manifest.invalid[:5])
        raise ManifestError(f"strict: {len(manifest.invalid)} invalid row(s), nothing was run. {first}")
    run = run_name(flow_run.get_name())
    owner = flow_run.get_id() or run  # leases (nst_run.lease) are held in the name of this flow run
    writer = ResultsWriter(output_uri, run, patience_s=storage_patience_s, part_rows=chunk_size, keep_rows=TABLE_ARTIFACT_ROWS, keep_failures=SUMMARY_FAILURES)
    writer.add([outcome_for_invalid(bad) for bad in manifest.invalid])
    for bad in manifest.invalid:
        logger.warning("invalid %s", bad.error)
    total = max(manifest.total, 1)
    progress_id = create_progress_artifact(progress=100.0 * len(manifest.invalid) / total, key=None, description="rows finished")
    delays = retry_delays(retries, retry_delay_s)
    stylize = stylize_items.with_options(retries=retries, retry_delay_seconds=delays, retry_jitter_factor=RETRY_JITTER_FACTOR)
    resolve = resolve_items.with_options(retries=retries, retry_delay_seconds=delays, retry_jitter_factor=RETRY_JITTER_FACTOR)
    events.run_started(run, owner, rows=manifest.total, invalid=len(manifest.invalid), manifest_uri=manifest_uri, output_uri=output_uri)

    def settle(outcomes: list[Outcome]) -> None:
        """Rows with an outcome: into the results table, then the UI's progress artifact and in-process listeners (nst run's line)."""
        writer.add(outcomes)
        now = Progress(manifest.total, writer.settled, writer.counts()["failed"], len(manifest.invalid), time.perf_counter() - started)
        update_progress_artifact(progress_id, 100.0 * now.done / total)  # type: ignore[arg-type]  # sync in a flow: a UUID, not the coroutine
        publish(now)

    capacity = runner_capacity()
    logger.info("dispatching to %s", capacity.describe())
    device_limit = DEVICE_LIMIT if DEVICE_LIMIT and device_limit_exists(DEVICE_LIMIT) else None
    if device_limit:
        logger.info("each optimisation holds a slot of the global concurrency limit %r", device_limit)
    window = SlidingWindow(capacity.window)
    pace = DispatchPace()  # units grow when the flow's cost per unit would leave devices waiting
    flight = ItemsInFlight()
    units: collections.deque[list[Work]] = collections.deque()
    pending_chunks = iter(chunks(rows_costliest_first(manifest.rows), chunk_size))  # longest first over the whole run
    resolving: collections.deque[Any] = collections.deque()  # resolve futures, oldest first
    random_weights = False
    releaser = ThreadPoolExecutor(1, thread_name_prefix="nst-release")  # off the dispatch loop: storage may be down
    failed_leases = LeaseReleases(output_uri, owner, storage_patience_s, releaser, logger)  # freed for the next run
    failed_tasks = FailedTasks(output_uri, owner, releaser, logger)  # their rows are settled by what storage holds

    items_left = len(manifest.rows)  # rows not yet given to a task (an upper bound on the items left)
    unit_floor = 1
    while True:
        while len(resolving) < RESOLVE_AHEAD and (chunk := next(pending_chunks, None)) is not None:
            events.wait_for_delivery(events.DELIVERY_WAIT_S)  # what Prefect keeps per task run stays bounded (flows/events.py)
            resolving.append(resolve.submit(chunk, output_uri, force, owner=owner))  # resolving overlaps computing
        while units and window.has_room():
            unit, submitting = units.popleft(), time.perf_counter()
            with _gpu_annotation():
                window.add(stylize.submit(
                    unit, output_uri, item_timeout_s, owner, lease_ttl_s, lease_wait_s, force,
                    batch_size=batch_size, store_retry_delays=delays, device_limit=device_limit,
                ), unit)  # fmt: skip
            pace.submitted(time.perf_counter() - submitting)
            items_left -= len(unit)
        if not window and not resolving:
            break
        # A new chunk is taken in only while at most a window's and two chunks' items wait: what is planned
        # but not submitted stays bounded (in items: units grow with the pace), and the costliest of that many
        # go first (costliest_first), so a long item two chunks on starts early rather than last, beside
        # short ones that fill the tail.
        waiting_items = sum(len(unit) for unit in units)
        room = capacity.window * unit_floor + RESOLVE_AHEAD * chunk_size
        wanted = resolving[0] if resolving and waiting_items < room else None
        finished, unit = window.next_done(also=wanted)
        collecting = time.perf_counter()
        if finished is wanted:
            resolved = resolving.popleft().result()  # a resolve that failed for good fails the run, as before
            forget_result(resolved, with_elements=False)  # its Work items are given to stylize tasks: their entries go once they do
            forget_dead_results()
            new, known = flight.add(resolved)
            random_weights = random_weights or any(o.weights_id.startswith("random:") for o in known)
            items_left -= len(resolved) - len(new)  # cached, unreadable, or joining an item in flight
            if (min_items := pace.min_items(capacity.devices, items_left)) != unit_floor:
                unit_floor = min_items
                logger.info("units of at least %d item(s): %.2f s of the flow's time per unit, %.2f s per item", min_items, pace.cost_s, pace.item_s)
            # The units not yet submitted are cut again with the new ones: at the pace measured now, and
            # with the ends of earlier chunks packed together (units cut at the run's start, before any
            # unit was timed, would otherwise go out one item each however the pace grew).
            waiting = [work for unit in units for work in unit] + new
            # A CPU: units of up to CPU_UNIT_ITEMS compatible items; the worker measures what batch pays.
            devices, most = (1, CPU_UNIT_ITEMS) if capacity.cpu_only else (capacity.devices, AUTO_MAX_ITEMS)
            units = collections.deque(costliest_first(plan_units(waiting, batch_size, devices, min_items, most)))
            settle(known)  # cached rows and inputs that could not be read
            continue
        try:
            returned = finished.result()
            computed = list(returned)
            forget_result(returned)  # its outcomes: no later task is given them
        except Exception as exc:  # retries exhausted, or an unexpected error: only this unit fails
            # Its items stored before the failure are finished: read off storage in the background and settled
            # once known (at the run's end if storage is down); the others fail with this reason.
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failed_tasks.add(unit, reason)
            computed = []
        forget_result(unit)  # the Work items the task was given, its last use of them
        forget_no_assets()
        computed += failed_tasks.ready()
        failed_leases.add(computed)
        random_weights = random_weights or any(o.weights_id.startswith("random:") for o in computed)
        settle(flight.settle(computed))
        for outcome in computed:
            pace.item_time(outcome.duration_s)
        pace.collected(time.perf_counter() - collecting)
    if late := failed_tasks.finish(storage_patience_s):  # what storage did not say during the run: waited for now
        failed_leases.add(late)
        random_weights = random_weights or any(o.weights_id.startswith("random:") for o in late)
        settle(flight.settle(late))
    failed_leases.finish()  # at most storage_patience_s of waiting for an outage, then leases expire
    releaser.shutdown()
    counts = writer.counts()
    failures = writer.lowest_failures()
    summary: dict[str, Any] = {
        "run": run,
        "run_folder": writer.folder,
        "manifest_uri": storage.sanitize_uri(manifest_uri),
        "output_uri": storage.sanitize_uri(output_uri),
        "rows": manifest.total,
        "counts": counts,
        "wall_time_s": time.perf_counter() - started,
        "random_weights": random_weights,
        "report": paths.run_file(writer.folder, paths.REPORT_FILE),  # built below, once the results table is stored
        "first_failures": [{"row": o.row, "id": o.id, "status": o.status, "error": o.error} for o in failures[:FIRST_FAILURES]],
    }
    summary.update(writer.finish(summary))
    build_run_report(writer.folder, storage_patience_s)  # summary["report"], + thumbs/ and report-files/; a task (tasks/steps.py)
    events.run_finished(run, owner, summary)
    create_table_artifact(
        table=[o.as_row() for o in writer.lowest_rows()],
        key="stylize-results",
        description=f"Results of run {run} (first {TABLE_ARTIFACT_ROWS} rows; all rows in {summary['results_csv']})",
    )
    create_markdown_artifact(markdown=_summary_markdown(summary, failures), key="stylize-summary", description=f"Run {run}")
    message = ", ".join(f"{n} {status}" for status, n in counts.items() if n or status in ("succeeded", "failed"))
    message += f"; results in {summary['results_csv']}"
    logger.info(message)
    if counts["failed"]:
        return Failed(message=message, data=summary)
    return Completed(message=message, data=summary)
