"""Computing items, as plain functions: the device pool, batched optimisation, OOM halving, outputs, leases.

* :class:`DevicePool` (one per process, :data:`DEVICES`): each device lent to one batch at a time, and
  every PyTorch computation on it run on its own long-lived thread.
* :func:`stylize_items`: lease each item of a unit (:mod:`nst_run.lease`), cut it into
  optimisations (:func:`optimisation_batches`), and run them as a pipeline: the next batch's inputs
  fetched, verified and decoded (:data:`INPUTS` keeps decoded inputs per process) and the last
  batch's files written (``meta.json`` last; transient errors retried in place) while the device
  optimises (on out-of-memory: halve, then one by one) and judges (:mod:`nst_core.quality`);
  release the leases; then wait for the items another run holds.
* :func:`auto_batch_size`: how many items of a size one optimisation holds: what this machine's
  first GPU holds, or on a CPU the batch size measured to cost least per item (decided here, where
  the device is, never by the flow).

Transient storage errors raise, so the caller (a Prefect task, ``tasks.steps``) retries; every other
failure of an item is returned as a ``failed`` outcome with its reason, so one bad item never stops
the others. This is the one module of :mod:`nst_run` that imports torch; no other module of the
package imports it (tests/unit/test_layers.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from nst_core import engine, history, images, quality, storage
from nst_core.engine import estimate_item_bytes, network_for
from nst_core.errors import NSTError
from nst_core.network import resolve_device, resolve_precision
from nst_core.weights import WeightsSpec
from nst_run import inputs, items, lease
from nst_run.paths import ItemPaths
from nst_run.planning import AUTO_MAX_ITEMS, CPU_UNIT_ITEMS, Outcome, Work, cached_outcome, chunks, item_paths, outcome_for_row

T = TypeVar("T")
Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]
DeviceSlot = Callable[[], contextlib.AbstractContextManager[Any]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How a worker runs the items it is given.

    Attributes:
        batch_size: items per optimisation; 0 = what this machine's device holds (:func:`auto_batch_size`).
        store_retry_delays: seconds to wait before each retry of an item's writes after a transient
            storage error (retried in place, the optimisation is not run again).
        hold_device: entered around each optimisation (after this process's device is free): the
            caller's cross-process limit, e.g. a Prefect global concurrency slot.
    """

    batch_size: int = 0
    store_retry_delays: Sequence[float] = ()
    hold_device: DeviceSlot = field(default=contextlib.nullcontext)


class DevicePool:
    """The devices of this process, each lent to one optimisation at a time and worked by one thread.

    ``auto`` takes any free device (every visible GPU, or the CPU); an explicit
    device waits for that one. Holding a device only while optimising lets
    other items' fetches and uploads overlap with compute.

    Every PyTorch computation on a device runs on that device's own
    long-lived thread (:meth:`run`), never on the task runner's threads. Why:
    on a CPU each thread that runs PyTorch keeps its own OpenMP team, and once
    more team threads are alive than there are cores, GNU OpenMP stops
    spin-waiting between parallel regions; the optimisation then ran 25 %
    slower (2 cores, 120 iterations at 128 px: 17.9 s against 14.2 s). On
    CUDA one thread per device keeps the current device and streams simple.
    """

    def __init__(self) -> None:
        count = torch.cuda.device_count()
        self.devices = [torch.device(f"cuda:{i}") for i in range(count)] or [torch.device("cpu")]
        self._free = list(self.devices)  # the pool's devices not lent now, under _returned
        self._returned = threading.Condition()
        self._explicit: dict[str, threading.Lock] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def acquire(self, wanted: str) -> Iterator[torch.device]:
        """Lend ``wanted`` (``auto``: the first free device of the pool), waiting until it is free.

        A pool device is lent once however it is asked for (``auto``, ``cuda``, ``cuda:0``; ``cpu`` on a
        machine without GPUs): two optimisations at once on one device would time each other and
        overrun the memory their batch sizes were cut for. A device outside the pool (the CPU beside
        GPUs) has a lock of its own.
        """
        device = None if wanted == "auto" else resolve_device(wanted)
        if device is not None and device not in self.devices:
            with self._lock:
                lock = self._explicit.setdefault(str(device), threading.Lock())
            with lock:
                yield device
            return
        with self._returned:
            self._returned.wait_for(lambda: device in self._free if device is not None else bool(self._free))
            lent = device if device is not None else self._free[0]
            self._free.remove(lent)
        try:
            yield lent
        finally:
            with self._returned:
                self._free.append(lent)
                self._returned.notify_all()

    def run(self, device: torch.device, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on ``device``'s own thread (acquire the device first); its result or exception."""
        with self._lock:
            if (worker := self._threads.get(str(device))) is None:
                worker = self._threads[str(device)] = ThreadPoolExecutor(1, thread_name_prefix=f"nst-{device}")
        return worker.submit(fn, *args).result()


DEVICES = DevicePool()
STYLE_CACHE = engine.StyleTargetCache()
INPUTS = inputs.DecodedImages(inputs.cache_budget_bytes())


def _fetch_images(work: Work) -> dict[str, Any]:
    """The row's inputs decoded, by role; each checked against the hash the item was named by.

    Decoded images are kept per process (:data:`INPUTS`): a style shared by many rows is read once.
    """
    loaded = {}
    for role, uri in work.row.input_uris().items():
        expected, max_pixels = work.input_sha256[role], work.row.params.max_pixels

        def load(uri: str = uri, role: str = role, expected: str = expected, max_pixels: int = max_pixels) -> Any:
            data = storage.read_bytes(uri, max_bytes=images.max_file_bytes(max_pixels))
            if storage.sha256_bytes(data) != expected:
                raise NSTError(f"{role} {storage.sanitize_uri(uri)} changed during the run (sha256 differs); re-run to pick it up")
            return images.load_image(data, name=storage.sanitize_uri(uri), max_pixels=max_pixels)

        loaded[role] = INPUTS.get((uri, expected, max_pixels), load)
    return loaded


def _failed(work: Work, error: str) -> Outcome:
    return outcome_for_row(work.row, "failed", error=error, item_id=work.item_id)


def _job(work: Work, loaded: dict[str, Any]) -> engine.Job:
    """The engine's job for a row whose inputs are loaded (by role: content, style[_k], style_mask[_k], init)."""
    row = work.row
    masks = tuple(loaded[role] for role in row.mask_roles()) if row.params.style_masks is not None else None
    names = {role: storage.sanitize_uri(uri) for role, uri in row.input_uris().items()}
    return engine.Job(loaded["content"], tuple(loaded[role] for role in row.style_roles()), row.params, loaded.get("init"), masks, names)


def _run_batch(batch: list[tuple[Work, dict[str, Any]]], time_limit_s: float | None, hold_device: DeviceSlot) -> list[engine.StyleResult]:
    params = batch[0][0].row.params
    jobs = [_job(work, loaded) for work, loaded in batch]
    with DEVICES.acquire(params.device) as device, hold_device():
        return DEVICES.run(device, _optimise_and_judge, jobs, device, batch[0][0], time_limit_s)


def _local_weights(params: Any) -> str | None:
    """A local copy of remote weights, fetched on this machine (the one that loads the network)."""
    if WeightsSpec.parse(params.weights).kind == "file" and storage.is_s3(params.weights):
        return str(storage.fetch_to_cache(params.weights))
    return None


def _optimise_and_judge(jobs: list[engine.Job], device: torch.device, first: Work, time_limit_s: float | None) -> list[engine.StyleResult]:
    """Everything a batch computes with PyTorch, run on the device's thread: optimise, judge, convert to RGB."""
    params = jobs[0].params
    # The weights the items were named by: a weights file replaced since then fails them, never computes them.
    named_by = first.weights_id.removeprefix("sha256:") if first.weights_id.startswith("sha256:") else None
    network = network_for(params, device, _local_weights(params), weights_sha256=named_by)
    results = engine.stylize_batch(jobs, network=network, cache=STYLE_CACHE, time_limit_s=time_limit_s)
    for job, result in zip(jobs, results, strict=True):
        # Judged by a VGG-19 with other weights than the optimised one (see nst_core.quality).
        score = quality.measure_result(result.image, job.content, job.styles, job.params, result.weights_id, device)
        result.extra["quality"] = score.as_dict()
        result.to_pil()
    return results


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# What cuBLAS and cuDNN raise when their own allocations (handles, workspaces) fail: a plain RuntimeError,
# not torch.OutOfMemoryError, though the cure is the same (a smaller batch).
_LIBRARY_OOM_MESSAGES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA out of memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory (PyTorch's allocator or a CUDA library's)."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and any(m in str(exc) for m in _LIBRARY_OOM_MESSAGES))


def _run_unless_oom(batch: list[tuple[Work, dict[str, Any]]], time_limit_s: float | None, hold_device: DeviceSlot) -> list[engine.StyleResult] | None:
    """The batch's results, or None when it ran out of memory (the device cache freed)."""
    try:
        return list(_run_batch(batch, time_limit_s, hold_device))
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
    _free_cuda_cache()  # out of the except block: its traceback no longer holds the failed pass's tensors
    return None


def _optimise_with_oom_split(batch: list[tuple[Work, dict[str, Any]]], time_limit_s: float | None, hold_device: DeviceSlot) -> list[engine.StyleResult | str]:
    """Run a batch; on out-of-memory halve it once, and a half that still does not fit runs item by item.

    An item that does not fit alone gets ``"out_of_memory"``; the others go on.
    """
    whole = _run_unless_oom(batch, time_limit_s, hold_device)
    if whole is not None:
        return list(whole)
    if len(batch) == 1:
        return ["out_of_memory"]
    half = len(batch) // 2
    out: list[engine.StyleResult | str] = []
    for part in (batch[:half], batch[half:]):
        done = _run_unless_oom(part, time_limit_s, hold_device)
        if done is None and len(part) > 1:
            done = [r for single in part for r in (_run_unless_oom([single], time_limit_s, hold_device) or ["out_of_memory"])]  # type: ignore[list-item]
        out += done if done is not None else ["out_of_memory"]
    return out


def _store(work: Work, output_uri: str, result: engine.StyleResult, owner: str = "") -> Outcome:
    """Write the item's files; ``meta.json`` last, as the mark of a finished item."""
    row, params = work.row, work.row.params
    paths = item_paths(work, output_uri)
    label = f"{row.id}  weights={result.weights_id}"
    storage.write_bytes(paths.image, images.encode(result.to_pil(), params.output_format), items.OUTPUT_CONTENT_TYPES[params.output_format])
    storage.write_bytes(paths.loss_csv, history.to_csv(result.history), "text/csv")
    storage.write_bytes(paths.loss_png, history.to_png(result.history, label), "image/png")
    snapshots = []
    for iteration, image in result.snapshots:
        snapshots.append(paths.snapshot_name(iteration))
        storage.write_bytes(storage.join(paths.folder, snapshots[-1]), images.encode(image, "png"), "image/png")
    inputs = {role: {"uri": storage.sanitize_uri(uri), "sha256": work.input_sha256[role]} for role, uri in row.input_uris().items()}
    meta = items.build_meta(
        item=work.item_id,
        row={"row": row.row, "id": row.id, "content_uri": storage.sanitize_uri(row.content_uri),
             "style_uri": "|".join(map(storage.sanitize_uri, row.style_uris)), **row.overrides, **row.meta},
        params=params,
        inputs=inputs,
        weights=params.weights,
        weights_id=result.weights_id,
        result=result,
        paths=paths,
        extra={**result.extra, "snapshots": snapshots, "run_owner": owner},
    )  # fmt: skip
    storage.write_bytes(paths.meta, items.meta_bytes(meta), "application/json")
    return cached_outcome(work, output_uri, meta, status="succeeded")


def _store_retried(work: Work, output_uri: str, result: engine.StyleResult, owner: str, delays: Sequence[float]) -> Outcome:
    """:func:`_store`, retried in place after each transient storage error (waiting ``delays[i]``, up to
    half as long again at random, before retry ``i``): an upload blip never re-runs an optimisation.
    A permanent error, or a transient one after the last delay, is raised."""
    for delay in [*delays, None]:
        try:
            return _store(work, output_uri, result, owner)
        except storage.StorageError as exc:
            if not exc.transient or delay is None:
                raise
            log.warning("storing item %s failed (%s); again in about %.1f s", work.item_id, exc, delay)
        time.sleep(delay * random.uniform(1.0, 1.5))
    raise AssertionError("unreachable")  # the loop returns or raises


def _fetch_batch(works: list[Work]) -> tuple[list[tuple[Work, dict[str, Any]]], dict[str, Outcome]]:
    """Inputs of ``works`` decoded, and the failures of those whose inputs cannot be used (transient errors raise)."""
    ready: list[tuple[Work, dict[str, Any]]] = []
    failed: dict[str, Outcome] = {}
    for work in works:
        try:
            ready.append((work, _fetch_images(work)))
        except storage.StorageError as exc:
            if exc.transient:
                raise
            failed[work.item_id] = _failed(work, str(exc))
        except NSTError as exc:
            failed[work.item_id] = _failed(work, str(exc).splitlines()[0])
        except Exception as exc:  # an unforeseen decoder error fails its own item, not the batch
            failed[work.item_id] = _failed(work, f"{type(exc).__name__}: {storage.sanitize_text(str(exc))}")
    return ready, failed


def optimisation_batches(works: list[Work], batch_size: int) -> list[list[Work]]:
    """``works`` cut into the optimisations this process runs: ``batch_size`` items each, or with 0
    what this machine's device holds (:func:`auto_batch_size`); incompatible items never share one."""
    groups: dict[tuple[object, ...], list[Work]] = {}
    for work in works:
        groups.setdefault(work.batch_key(), []).append(work)
    return [part for group in groups.values() for part in chunks(group, batch_size or auto_batch_size(group[0], len(group)))]


def _store_all(ready: list[tuple[Work, dict[str, Any]]], results: list[engine.StyleResult | str], output_uri: str,
               owner: str, delays: Sequence[float], logger: Logger) -> dict[str, Outcome]:  # fmt: skip
    outcomes: dict[str, Outcome] = {}
    for (work, _), result in zip(ready, results, strict=True):
        if isinstance(result, str):
            outcomes[work.item_id] = _failed(work, result)
            continue
        try:
            outcomes[work.item_id] = _store_retried(work, output_uri, result, owner, delays)
        except storage.StorageError as exc:
            if exc.transient:
                raise
            # A refused write (permission, quota): meta.json was not written, so the item is not done.
            outcomes[work.item_id] = _failed(work, f"could not store the outputs: {exc}")
            continue
        logger.info(
            "item %s (row %s) done: %d iterations in %.1f s on %s, %s (batch of %d)",
            work.row.id, work.row.row, result.iterations, result.wall_time_s, result.device, result.precision, len(ready),
        )  # fmt: skip
    return outcomes


def _compute(works: list[Work], output_uri: str, time_limit_s: float | None, owner: str, logger: Logger, run: RunOptions) -> dict[str, Outcome]:
    """Fetch, optimise and store ``works``, one optimisation batch after another, as a pipeline: the
    next batch's inputs are fetched and decoded, and the last batch's outputs encoded and uploaded,
    while the device optimises. An item whose inputs cannot be used fails alone."""
    outcomes: dict[str, Outcome] = {}
    batches = optimisation_batches(works, run.batch_size)
    if not batches:  # every item was held by another run, or done meanwhile
        return outcomes
    with ThreadPoolExecutor(1, thread_name_prefix="nst-fetch") as fetcher, ThreadPoolExecutor(1, thread_name_prefix="nst-store") as storer:
        stores = []
        fetching = fetcher.submit(_fetch_batch, batches[0])
        for later in [*batches[1:], None]:
            ready, failed = fetching.result()  # a transient error raises here: the task is retried
            outcomes.update(failed)
            if later is not None:
                fetching = fetcher.submit(_fetch_batch, later)
            if not ready:
                continue
            try:
                results = _optimise_with_oom_split(ready, time_limit_s, run.hold_device)
            except (NSTError, engine.TimeLimitExceeded, ValueError) as exc:
                results = [str(exc).splitlines()[0]] * len(ready)
            stores.append(storer.submit(_store_all, ready, results, output_uri, owner, run.store_retry_delays, logger))
        for stored in stores:
            outcomes.update(stored.result())
    return outcomes


def _claim(work: Work, output_uri: str, owner: str, ttl_s: float, force: bool) -> lease.Lease | lease.LeaseRecord | Outcome:
    """Take the item's lease; a ``done_elsewhere`` outcome when another run finished it meanwhile."""
    paths = item_paths(work, output_uri)
    got = lease.acquire(paths.folder, owner, ttl_s)
    if isinstance(got, lease.Lease) and not force and (meta := items.read_meta(paths)) is not None:
        got.release()
        return _finished_outcome(work, output_uri, meta, owner)
    return got


def _finished_outcome(work: Work, output_uri: str, meta: dict[str, Any], owner: str) -> Outcome:
    """A finished item's outcome: ``succeeded`` when this run (``owner``: an earlier attempt of its task,
    or a task that failed after storing it) wrote its ``meta.json``, ``done_elsewhere`` when another run did."""
    return cached_outcome(work, output_uri, meta, status="succeeded" if meta.get("run_owner") == owner else "done_elsewhere")


class LeaseReleases:
    """Frees the leases ``owner`` still holds on failed items (their task could not: storage was down, say),
    on ``executor``, off the dispatch loop; otherwise they would hold up the next run until their TTL passed.

    One outage costs at most ``patience_s`` of waiting in all, not ``patience_s`` per item: once a release
    has waited that long in vain, the next ones try once each (a lease not freed expires by itself), until
    one succeeds again. The releases run one after another on ``executor`` (one thread), which is what
    makes that state safe to keep here.
    """

    def __init__(self, output_uri: str, owner: str, patience_s: float, executor: Executor, logger: Logger = log):
        self.output_uri, self.owner, self.patience_s, self.executor, self.logger = output_uri, owner, patience_s, executor, logger
        self._submitted: list[Future[None]] = []
        self._storage_silent = False  # a release waited the whole patience in vain, and none succeeded since

    def add(self, outcomes: Iterable[Outcome]) -> None:
        """Release the leases of the failed ones among ``outcomes`` in the background."""
        if failed := [o for o in outcomes if o.status == "failed" and o.item_id]:
            self._submitted.append(self.executor.submit(self._release, failed))

    def finish(self) -> None:
        """Wait for every release submitted (each bounded as the class says)."""
        for release in self._submitted:
            release.result()
        self._submitted = []

    def _release(self, failed: list[Outcome]) -> None:
        for outcome in failed:
            folder = ItemPaths(self.output_uri, outcome.item_id).folder
            patience = 0.0 if self._storage_silent else self.patience_s
            try:
                storage.retry_transient(lambda folder=folder: lease.release_owned(folder, self.owner), patience)  # type: ignore[misc]
                self._storage_silent = False
            except storage.StorageError as exc:
                self._storage_silent = self._storage_silent or exc.transient
                self.logger.warning("lease of item %s not released (%s); it expires by itself", outcome.item_id, exc)


def outcomes_of_failed_task(works: Sequence[Work], reason: str, output_uri: str, owner: str, patience_s: float, logger: Logger = log) -> list[Outcome | None]:
    """The outcomes of a task that failed for good (its retries spent, or an unexpected error) on ``works``.

    A task stores its items one after another, so it may fail on one item's files (storage went down)
    after another item was finished: that item's ``meta.json``, written last, says so. Per item:
    finished by this run (``owner``), ``succeeded``; by another run meanwhile, ``done_elsewhere``; not
    finished (no ``meta.json``, or one that does not parse), ``failed`` with ``reason``; ``None`` when
    storage did not answer within ``patience_s`` (for all the items together): nothing is taken for
    finished unread.
    """
    deadline = time.monotonic() + patience_s
    outcomes: list[Outcome | None] = []
    for work in works:
        paths = item_paths(work, output_uri)
        try:
            meta = storage.retry_transient(lambda paths=paths: items.read_meta(paths), max(0.0, deadline - time.monotonic()))  # type: ignore[misc]
        except storage.StorageError as exc:
            if exc.transient:
                outcomes.append(None)
                continue
            meta = None
        except ValueError:  # a meta.json that does not parse is no finished item's mark
            meta = None
        outcomes.append(_failed(work, reason) if meta is None else _finished_outcome(work, output_uri, meta, owner))
    return outcomes


class FailedTasks:
    """The rows of tasks that failed for good, settled by what storage holds (:func:`outcomes_of_failed_task`).

    :meth:`add` reads a failed unit's items at once, on ``executor`` (off the dispatch loop); :meth:`ready`
    gives the outcomes read so far. An item storage did not answer for (it is down: the likely reason the
    task failed) waits for :meth:`finish`, at the run's end, which reads it again for up to the run's
    storage patience, shared by all such items, and reports it failed if storage stays silent (a re-run
    finds it cached if it was stored).
    """

    def __init__(self, output_uri: str, owner: str, executor: Executor, logger: Logger = log):
        self.output_uri, self.owner, self.executor, self.logger = output_uri, owner, executor, logger
        self._reading: list[tuple[list[Work], str, Future[list[Outcome | None]]]] = []
        self._unread: list[tuple[Work, str]] = []

    def add(self, works: Sequence[Work], reason: str) -> None:
        self._reading.append((list(works), reason, self.executor.submit(outcomes_of_failed_task, works, reason, self.output_uri, self.owner, 0.0, self.logger)))

    def ready(self, wait: bool = False) -> list[Outcome]:
        """The outcomes read since the last call (all reads awaited with ``wait``)."""
        found: list[Outcome] = []
        for entry in [e for e in self._reading if wait or e[2].done()]:
            self._reading.remove(entry)
            works, reason, read = entry
            for work, outcome in zip(works, read.result(), strict=True):
                if outcome is None:
                    self._unread.append((work, reason))
                else:
                    found.append(outcome)
        return found

    def finish(self, patience_s: float) -> list[Outcome]:
        """The rest: every read awaited, then the items storage did not answer for read again."""
        found = self.ready(wait=True)
        deadline = time.monotonic() + patience_s
        for work, reason in self._unread:
            (outcome,) = outcomes_of_failed_task([work], reason, self.output_uri, self.owner, max(0.0, deadline - time.monotonic()), self.logger)
            if outcome is None:
                self.logger.warning("item %s (row %s): storage did not say whether it was stored; reported failed", work.item_id, work.row.row)
                outcome = _failed(work, reason)
            found.append(outcome)
        self._unread = []
        return found


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def stylize_items(
    works: list[Work],
    output_uri: str,
    time_limit_s: float | None = None,
    owner: str | None = None,
    lease_ttl_s: float = lease.DEFAULT_TTL_S,
    lease_wait_s: float = 600.0,
    force: bool = False,
    logger: Logger = log,
    options: RunOptions = RunOptions(),
) -> list[Outcome]:
    """Stylise compatible items, in optimisation batches sized by ``options``, and store each one's outputs.

    Each item is leased first (:mod:`nst_run.lease`, ``owner`` is the flow
    run), so concurrent runs never compute one item twice: an item another
    run holds is waited for up to ``lease_wait_s`` (``done_elsewhere`` when
    its result appears; taken over and computed here when its holder lets
    go or dies; ``in_progress_elsewhere`` when the wait ends first). An item
    whose inputs cannot be used fails alone; the rest of the batch goes on.
    """
    owner = owner or default_owner()
    outcomes: dict[str, Outcome] = {}
    with lease.LeaseKeeper(lease_ttl_s) as keeper:

        def run_leased(batch: list[Work]) -> None:
            try:
                outcomes.update(_compute(batch, output_uri, time_limit_s, owner, logger, options))
            finally:
                for work in batch:
                    if (held := keeper.drop(work.item_id)) is not None:
                        held.release()

        def claim_all(batch: list[Work]) -> tuple[list[Work], list[tuple[Work, lease.LeaseRecord]]]:
            mine, elsewhere = [], []
            for work in batch:
                got = _claim(work, output_uri, owner, lease_ttl_s, force)
                if isinstance(got, Outcome):
                    outcomes[work.item_id] = got
                elif isinstance(got, lease.Lease):
                    keeper.hold(work.item_id, got)
                    mine.append(work)
                else:
                    elsewhere.append((work, got))
            return mine, elsewhere

        try:
            mine, elsewhere = claim_all(works)
            run_leased(mine)
            deadline = time.monotonic() + lease_wait_s
            poll_s = max(0.2, min(2.0, lease_ttl_s / 10))
            while elsewhere and time.monotonic() < deadline:
                time.sleep(poll_s)
                mine, elsewhere = claim_all([work for work, _ in elsewhere])
                run_leased(mine)
        finally:
            for work in works:
                if (held := keeper.drop(work.item_id)) is not None:
                    held.release()
    for work, holder in elsewhere:
        until = time.strftime("%H:%M:%S UTC", time.gmtime(holder.expires_at))
        outcomes[work.item_id] = outcome_for_row(
            work.row, "in_progress_elsewhere", item_id=work.item_id,
            error=f"another run ({holder.owner}) is computing this item (lease until {until}); a re-run picks up its result",
        )  # fmt: skip
    return [outcomes[work.item_id] for work in works]


def auto_batch_size(work: Work, items: int = AUTO_MAX_ITEMS) -> int:
    """Items of ``work``'s size one optimisation may hold on this machine (at most :data:`AUTO_MAX_ITEMS`),
    for a group of ``items`` such items (a CPU measures no batch larger than that: one item, no measurement).

    On a GPU: what 70 % of the first GPU's available memory holds (free on the card plus what PyTorch's
    allocator holds unused). On a CPU: the batch size measured to cost least per item
    (:func:`_cpu_batch_size`). An item whose size is not known yet: 1.
    """
    params = work.row.params
    try:
        device = resolve_device(params.device)
    except ValueError:  # a device this machine does not have: the optimisation fails the items, and says why
        return 1
    if work.content_size is None:
        return 1
    width, height = images.fitted_size(*work.content_size, params.size)
    item_bytes = estimate_item_bytes(height, width, params, resolve_precision(params.precision, device))
    if device.type == "cpu":
        return _cpu_batch_size(work, device, height, width, item_bytes, items)
    free, _ = torch.cuda.mem_get_info(device)  # this item's GPU, not the thread's current one
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(max(1, min(AUTO_MAX_ITEMS, 0.7 * free // item_bytes)))


_CPU_BATCH_SIZES: dict[tuple[object, ...], int] = {}


def _cpu_batch_size(work: Work, device: torch.device, height: int, width: int, item_bytes: int, items: int) -> int:
    """:func:`nst_core.engine.cpu_batch_size` for ``work``'s parameters and size, at most ``items``,
    :data:`CPU_UNIT_ITEMS` and what half the machine's available memory holds (a limit of one is not
    measured); measured on the CPU's own thread once per parameters, long side and limit (later calls
    do not wait for the thread). 1 when the measurement cannot load the network: the
    optimisation then reports why."""
    params = work.row.params
    limit = min(items, CPU_UNIT_ITEMS, max(1, int(0.5 * available_memory_bytes() // max(1, item_bytes))))
    if limit <= 1:
        return 1
    key = (params.batch_key(), max(height, width), limit)
    if (known := _CPU_BATCH_SIZES.get(key)) is not None:
        return known
    try:
        size = DEVICES.run(device, engine.cpu_batch_size, params, height, width, limit, _local_weights(params))
    except (NSTError, storage.StorageError, OSError) as exc:
        log.warning("could not measure the CPU's batch size (%s): one item per optimisation", storage.sanitize_text(str(exc)))
        return 1
    _CPU_BATCH_SIZES[key] = size
    return size


def available_memory_bytes() -> int:
    """Memory the machine can give without swapping: ``MemAvailable`` (Linux), else the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
