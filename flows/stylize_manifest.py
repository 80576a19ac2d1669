"""The flow data teams run: a CSV manifest in, stylised images, losses and metadata out.

Composition only: read and validate the manifest, resolve rows to
content-addressed items chunk by chunk, plan batches, fan them out to ``gpu``-tagged
tasks (``tasks.steps``), collect the outcomes into the results table
(``nst_run.results``), the report and Prefect artifacts. The work itself is
``nst_run``'s plain functions.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from pydantic import Field

from flows import events
from flows.hooks import describe_parameters, notify_failure
from flows.progress import Progress, publish
from nst_core import storage
from nst_core.params import StyleParams
from nst_run import paths
from nst_run.execute import auto_batch_size, release_failed_leases
from nst_run.lease import DEFAULT_TTL_S
from nst_run.manifest import ManifestError
from nst_run.planning import Outcome, Work, chunks, for_row, outcome_for_invalid, outcome_for_row, plan_batches
from nst_run.results import ResultsWriter, run_name
from tasks.steps import build_run_report, read_manifest, resolve_items, stylize_items

TABLE_ARTIFACT_ROWS = 1000
FIRST_FAILURES = 10  # failed and invalid rows named in summary.json (and by `nst run`); all are in results.csv

DASK_ADDRESS_ENV = "NST_DASK_ADDRESS"  # tcp://scheduler:8786: run the tasks on that dask-distributed cluster
DASK_RESOURCE_ENV = "NST_DASK_RESOURCE"  # the worker resource one batch holds (default GPU; empty: none)


def task_runner_from_settings() -> Any:
    """The task runner: a dask-distributed cluster when NST_DASK_ADDRESS is set, else threads in this process."""
    address = os.environ.get(DASK_ADDRESS_ENV)
    if address:
        return on_dask(address).task_runner
    return ThreadPoolTaskRunner(max_workers=int(os.environ.get("NST_THREADS", "8")))


def on_dask(address: str) -> Any:
    """This flow with its tasks sent to the dask-distributed scheduler at ``address``."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:  # an extra: workers and the flow's machine install it with nst-bulk[dask]
        raise RuntimeError(f"{DASK_ADDRESS_ENV}={address} needs prefect-dask: pip install 'nst-bulk[dask]'") from None

    return stylize_manifest.with_options(task_runner=DaskTaskRunner(address=address))  # type: ignore[arg-type]  # prefect-dask's runner is a TaskRunner of its own futures


def _gpu_annotation() -> contextlib.AbstractContextManager[Any]:
    """On a dask runner, each batch holds one unit of the workers' GPU resource (``--resources GPU=1``)."""
    context = FlowRunContext.get()
    resource = os.environ.get(DASK_RESOURCE_ENV, "GPU")
    if context is None or not resource or type(context.task_runner).__name__ != "DaskTaskRunner":
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={resource: 1})  # the results table artifact shows the first rows; the files have all


RETRY_JITTER_FACTOR = 0.5  # each retry waits a random time around its delay (at most 1.5x): workers do not retry in step


def retry_delays(retries: int, first_delay_s: float, cap_s: float = 600.0) -> list[float]:
    """Delays before each task retry: Prefect's ``exponential_backoff`` from ``first_delay_s`` (doubling: a blip
    is retried soon, an outage waited out), each capped at ``cap_s``; tasks add ``RETRY_JITTER_FACTOR``."""
    return [min(delay, cap_s) for delay in exponential_backoff(backoff_factor=first_delay_s)(retries)]


def _settled(resolved: list[Work | Outcome], computed: dict[str, Outcome]) -> tuple[int, int]:
    """How many of a chunk's rows have an outcome (resolved ones, or their item computed), and how many failed."""
    outcomes = [r if isinstance(r, Outcome) else computed.get(r.item_id) for r in resolved]
    return sum(o is not None for o in outcomes), sum(o is not None and o.status == "failed" for o in outcomes)


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
        lines += ["", "## Failed and invalid rows (first 50)", "", "| row | id | status | error |", "|---|---|---|---|"]
        for o in failures[:50]:
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
    batch_size: Annotated[int, Field(ge=0, le=256, description="Items optimised together when their size and parameters match; 0 = automatic (1 on CPU, from free GPU memory on CUDA).")] = 0,
    chunk_size: Annotated[int, Field(ge=1, le=10_000, description="Rows resolved and submitted together; bounds the task runs in flight.")] = 64,
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
    writer = ResultsWriter(output_uri, run, patience_s=storage_patience_s)
    writer.add([outcome_for_invalid(bad) for bad in manifest.invalid])
    for bad in manifest.invalid:
        logger.warning("invalid %s", bad.error)
    total = max(manifest.total, 1)
    progress_id = create_progress_artifact(progress=100.0 * len(manifest.invalid) / total, key=None, description="rows finished")
    delays = retry_delays(retries, retry_delay_s)
    stylize = stylize_items.with_options(retries=retries, retry_delay_seconds=delays, retry_jitter_factor=RETRY_JITTER_FACTOR)
    resolve = resolve_items.with_options(retries=retries, retry_delay_seconds=delays, retry_jitter_factor=RETRY_JITTER_FACTOR)
    events.run_started(run, owner, rows=manifest.total, invalid=len(manifest.invalid), manifest_uri=manifest_uri, output_uri=output_uri)

    def progress(resolved: list[Work | Outcome], computed: dict[str, Outcome]) -> None:
        """Rows of earlier chunks plus this chunk's settled ones: the UI's artifact, then in-process listeners (nst run's line)."""
        done, failed = _settled(resolved, computed)
        now = Progress(manifest.total, len(writer.outcomes) + done, failed_before + failed, len(manifest.invalid), time.perf_counter() - started)
        update_progress_artifact(progress_id, 100.0 * now.done / total)  # type: ignore[arg-type]  # sync in a flow: a UUID, not the coroutine
        publish(now)

    random_weights = False
    failed_before = 0  # rows of earlier chunks that failed (progress figures)
    for chunk in chunks(manifest.rows, chunk_size):
        resolved = resolve(chunk, output_uri, force)
        progress(resolved, {})  # cached rows and inputs that could not be read
        # Rows with the same item id share one computation; compatible items share a batch.
        first_of: dict[str, Work] = {}
        for r in resolved:
            if isinstance(r, Work):
                first_of.setdefault(r.item_id, r)
        batches = plan_batches(list(first_of.values()), batch_size, auto_batch_size)
        with _gpu_annotation():
            futures = [
                stylize.submit(batch, output_uri, item_timeout_s, owner, lease_ttl_s, lease_wait_s, force) for batch in batches
            ]
        computed: dict[str, Outcome] = {}
        batch_of = {future.task_run_id: batch for batch, future in zip(batches, futures, strict=True)}
        for future in as_completed(futures):  # as each finishes: progress shows a batch when it is done, not after slower ones
            batch = batch_of[future.task_run_id]
            try:
                computed.update({o.item_id: o for o in future.result()})
            except Exception as exc:  # retries exhausted, or an unexpected error: only this batch fails
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                computed.update({w.item_id: outcome_for_row(w.row, "failed", error=reason, item_id=w.item_id) for w in batch})
            progress(resolved, computed)
        outcomes = [r if isinstance(r, Outcome) else for_row(computed[r.item_id], r) for r in resolved]
        failed_before += sum(o.status == "failed" for o in outcomes)
        release_failed_leases(computed.values(), output_uri, owner, storage_patience_s, logger)
        random_weights = random_weights or any(o.weights_id.startswith("random:") for o in outcomes)
        writer.add(outcomes)  # the progress artifact already shows these rows (updated per batch above)
    counts = writer.counts()
    failures = [o for o in sorted(writer.outcomes, key=lambda o: o.row) if o.status in ("failed", "invalid")]
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
        table=[o.as_row() for o in sorted(writer.outcomes, key=lambda o: o.row)[:TABLE_ARTIFACT_ROWS]],
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
