"""Planning a run, as plain functions: rows resolved to items, items grouped into batches.

* :class:`Work`: a row to compute (its ``item_id``, input hashes, weights id, content size);
  :class:`Outcome`: what happened to a row (one line of the results table).
* :func:`resolve_items`: identify each row's inputs (each distinct URI once; :mod:`nst_run.inputs`),
  compute ``item_id``, see whether the item is already done (``meta.json`` present: ``cached``).
* :func:`plan_units`: items in the units tasks compute (compatible ones, same parameters and sizes,
  together; small groups packed into one unit when the flow needs bigger units);
  :func:`rows_costliest_first` and :func:`costliest_first` the order rows and units are dispatched in
  (by :func:`item_cost`);
  :class:`ItemsInFlight` the rows waiting on each item; :func:`for_row` the outcome of each row
  from the computation it shares.

No Prefect and no torch here: ``nst validate`` resolves a manifest with these functions, and
the tasks (``tasks.steps``) wrap them.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from nst_core import images, storage
from nst_core.errors import NSTError
from nst_core.params import StyleParams
from nst_core.weights import WeightsSpec, weights_id
from nst_run import inputs, items
from nst_run.manifest import InvalidRow, RowSpec
from nst_run.paths import ItemPaths


@dataclass(frozen=True)
class Work:
    """A resolved row: its item id and the hashes of its inputs."""

    row: RowSpec
    item_id: str
    input_sha256: dict[str, str]
    weights_id: str
    content_size: tuple[int, int] | None = None  # (width, height) after EXIF orientation, read from the header

    def batch_key(self) -> tuple[object, ...]:
        """Works with equal keys can share one optimisation: same parameters and same size at every stage."""
        if self.content_size is None:
            return ("alone", self.item_id)
        shapes = tuple(images.fitted_size(*self.content_size, side) for side, _ in self.row.params.stages)
        return (self.row.params.batch_key(), shapes)


@dataclass
class Outcome:
    """What happened to one manifest row (one line of the results table)."""

    row: int
    id: str
    status: str
    error: str = ""
    item_id: str = ""
    output_uri: str = ""
    content_uri: str = ""
    style_uri: str = ""
    iterations: int = 0
    duration_s: float = 0.0
    device: str = ""
    weights_id: str = ""
    losses: dict[str, float] = field(default_factory=dict)
    style_distance: float | None = None  # quality score (nst_core.quality), lower is better
    content_distance: float | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every cell the results table, artifacts and logs show comes through here: no credential passes.
        self.id, self.error = storage.sanitize_cells(self.id), storage.sanitize_cells(self.error)
        self.content_uri, self.style_uri = storage.sanitize_cells(self.content_uri), storage.sanitize_cells(self.style_uri)
        self.meta = storage.sanitize_cells(self.meta)

    def as_row(self) -> dict[str, Any]:
        data = asdict(self)
        losses, meta = data.pop("losses"), data.pop("meta")
        data.update({f"loss_{k.replace(':', '_')}": v for k, v in losses.items() if k in ("total", "content", "style", "tv")})
        data.update(meta)
        return data


def outcome_for_invalid(bad: InvalidRow) -> Outcome:
    return Outcome(row=bad.row, id=bad.id, status="invalid", error=bad.error, meta=bad.meta)


def outcome_for_row(row: RowSpec, status: str, **kwargs: Any) -> Outcome:
    return Outcome(row=row.row, id=row.id, status=status, content_uri=row.content_uri, style_uri=row.style_uri, meta=row.meta, **kwargs)


WEIGHTS_MAX_BYTES = 4 << 30  # a weights file larger than this is refused unread (VGG-19's is 548 MB)


def _weights_identity(weights: str, output_uri: str) -> str:
    """The weights id of a spec without loading a network: a file's is its sha256, learned the way an
    input's is (:func:`nst_run.inputs.identify`: a re-run reads no file it already hashed)."""
    spec = WeightsSpec.parse(weights)
    if spec.kind != "file":
        return weights_id(weights)
    return "sha256:" + inputs.identify(weights, WEIGHTS_MAX_BYTES, output_uri).sha256


def _check_weights_sha256(params: StyleParams, weights_id: str) -> None:
    """The row's own ``weights_sha256`` against the file's id (checked per row: the id is cached per URI)."""
    expected = (params.weights_sha256 or "").lower()
    if expected and weights_id != "sha256:" + expected:
        digest = weights_id.removeprefix("sha256:")
        raise NSTError(f"weights {storage.sanitize_uri(params.weights)}: sha256 is {digest}, expected {params.weights_sha256}")


def resolve_items(rows: list[RowSpec], output_uri: str, force: bool, workers: int = 8, owner: str = "") -> list[Work | Outcome]:
    """Identify every row's inputs (each distinct URI once), compute item ids, detect finished items.

    An input's sha256 comes from its record under ``output_uri`` when the object has not changed
    since it was hashed, else from reading it once, streamed (:func:`nst_run.inputs.identify`).

    Args:
        rows: manifest rows.
        output_uri: the run's output prefix (items, input records).
        force: report no item as finished (they are all recomputed).
        workers: inputs identified at once.
        owner: the flow run resolving; an item that run itself finished (an earlier chunk's row
            with the same item) is reported ``succeeded``, not ``cached``.

    Returns:
        Per row, a :class:`Work` to do or an :class:`Outcome` (``cached``, or ``failed`` when an
        input cannot be read).

    Raises:
        StorageError: a transient storage error (the caller retries).
    """
    limits: dict[str, int] = {}  # per distinct input: the largest file a row using it accepts
    for row in rows:
        for uri in row.input_uris().values():
            limits[uri] = max(limits.get(uri, 0), images.max_file_bytes(row.params.max_pixels))

    def identify(uri: str) -> inputs.Identity | Exception:
        try:
            return inputs.identify(uri, limits[uri], output_uri)
        except storage.StorageError as exc:
            if exc.transient:
                raise
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        known = dict(zip(limits, pool.map(identify, limits), strict=True))
    weights: dict[str, str | Exception] = {}
    resolved: list[Work | Outcome] = []
    for row in rows:
        missing = [f"{role} {error}" for role, uri in row.input_uris().items() if isinstance(error := known[uri], Exception)]
        if missing:
            resolved.append(outcome_for_row(row, "failed", error="; ".join(missing)))
            continue
        if row.params.weights not in weights:
            try:
                weights[row.params.weights] = _weights_identity(row.params.weights, output_uri)
            except (storage.StorageError, NSTError) as exc:
                if isinstance(exc, storage.StorageError) and exc.transient:
                    raise
                weights[row.params.weights] = exc
        ident = weights[row.params.weights]
        try:
            if isinstance(ident, Exception):
                raise ident
            _check_weights_sha256(row.params, ident)
        except (storage.StorageError, NSTError) as exc:
            resolved.append(outcome_for_row(row, "failed", error=str(exc)))
            continue
        found = {role: known[uri] for role, uri in row.input_uris().items()}
        sha = {role: identity.sha256 for role, identity in found.items() if isinstance(identity, inputs.Identity)}
        content = found["content"]
        assert isinstance(content, inputs.Identity)
        resolved.append(Work(row, items.item_id(sha, row.params, ident), sha, ident, content_size=content.content_size))
    todo = [w for w in resolved if isinstance(w, Work)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        metas = list(pool.map(lambda w: None if force else items.read_meta(item_paths(w, output_uri)), todo))
    done = {w.item_id: meta for w, meta in zip(todo, metas, strict=True) if meta is not None}

    def finished(work: Work) -> Outcome:
        meta = done[work.item_id]
        return cached_outcome(work, output_uri, meta, status="succeeded" if owner and meta.get("run_owner") == owner else "cached")

    return [finished(r) if isinstance(r, Work) and r.item_id in done else r for r in resolved]


def item_paths(work: Work, output_uri: str) -> ItemPaths:
    return ItemPaths(output_uri, work.item_id, work.row.params.output_format)


def cached_outcome(work: Work, output_uri: str, meta: dict[str, Any], status: str = "cached") -> Outcome:
    return outcome_for_row(
        work.row,
        status,
        item_id=work.item_id,
        output_uri=item_paths(work, output_uri).image,
        iterations=int(meta.get("iterations", 0)),
        duration_s=float(meta.get("wall_time_s", 0.0)),
        device=str(meta.get("device", "")),
        weights_id=str(meta.get("weights", {}).get("id", work.weights_id)),
        losses=dict(meta.get("final_losses", {})),
        style_distance=meta.get("quality", {}).get("style_distance"),
        content_distance=meta.get("quality", {}).get("content_distance"),
    )


# --- batches -------------------------------------------------------------------------------


def chunks(seq: list[Any], size: int) -> list[list[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


AUTO_MAX_ITEMS = 64  # the most items one task is given, or one optimisation holds, with automatic batching


CPU_UNIT_ITEMS = 8
"""The most items of one group a unit holds on a CPU: the largest batch a CPU worker measures
(``nst_core.execution.CPU_BATCH_SIZES``; a CPU optimises several items at once only where it measured
that cheaper per item, and a small unit shows progress sooner)."""


def plan_units(works: list[Work], batch_size: int, devices: int = 1, min_items: int = 1, max_items: int = AUTO_MAX_ITEMS) -> list[list[Work]]:
    """Group items into the units one task computes: compatible ones (same parameters, same size at every
    stage) together, and small groups packed together when ``min_items`` asks for bigger units.

    Args:
        works: distinct items (one per item id).
        batch_size: items per optimisation. Given (> 0), a unit holds whole optimisations of that many.
            0 (automatic): the worker sizes optimisations by its own device's memory
            (:func:`nst_run.execute.optimisation_batches`), and a group here is cut into at least
            ``devices`` units (at most :data:`AUTO_MAX_ITEMS` items each), so no free device waits
            while another holds all the work.
        devices: devices the task runner has (0 or 1: one).
        max_items: with automatic batching, the most items of one group a unit holds (unless
            ``min_items`` asks for more): :data:`CPU_UNIT_ITEMS` on a CPU.
        min_items: the fewest items a unit may hold so the flow can dispatch fast enough
            (:meth:`DispatchPace.min_items`); never more than :data:`AUTO_MAX_ITEMS` with automatic batching.
            Groups smaller than that (rows of other sizes or parameters: often each its own) are packed
            together into units of at least ``min_items``: the worker still optimises each group on its
            own (:func:`nst_run.execute.optimisation_batches`), but the flow pays for one task run.
    """
    groups: dict[tuple[object, ...], list[Work]] = {}
    for work in works:
        groups.setdefault(work.batch_key(), []).append(work)
    units: list[list[Work]] = []
    for group in groups.values():
        if batch_size:
            size = batch_size * max(1, math.ceil(min_items / batch_size))
        else:
            size = min(AUTO_MAX_ITEMS, max(min_items, min(max_items, math.ceil(len(group) / max(1, devices)))))
        units += chunks(group, max(1, size))
    floor = min_items if batch_size else min(min_items, AUTO_MAX_ITEMS)
    if floor <= 1:
        return units
    packed, small = [u for u in units if len(u) >= floor], [u for u in units if len(u) < floor]
    current: list[Work] = []
    for unit in small:
        if current and not batch_size and len(current) + len(unit) > AUTO_MAX_ITEMS:
            packed.append(current)
            current = []
        current += unit
        if len(current) >= floor:
            packed.append(current)
            current = []
    return packed + ([current] if current else [])


def item_cost(params: StyleParams, content_size: tuple[int, int] | None) -> float:
    """An item's expected optimisation cost, in pixel-iterations: its iterations at each stage times that
    stage's pixels (an iteration's convolutions scale with the pixels). A content of unknown size (a row
    not yet resolved) counts as square: its long side is known, its aspect is not. Early stopping makes
    this an upper bound; only the order of work depends on it."""
    width, height = content_size or (1, 1)
    cost = 0.0
    for side, iterations in params.stages:
        fitted = images.fitted_size(width, height, side)
        cost += iterations * fitted[0] * fitted[1]
    return cost


def unit_cost(unit: list[Work]) -> float:
    """A unit's expected optimisation cost: the sum of its items' :func:`item_cost`."""
    return sum(item_cost(work.row.params, work.content_size) for work in unit)


def costliest_first(units: list[list[Work]]) -> list[list[Work]]:
    """Units in dispatch order, the costliest first (stable for equal costs: manifest order).

    The run's last units decide how long devices wait for the slowest one; dispatching the long ones
    early and the short ones last (longest-processing-time first, Graham 1969) leaves the short ones
    to fill the devices' ends. Applied to the units waiting for a device (the flow lets at most a window
    and two chunks of them wait); :func:`rows_costliest_first` orders the whole manifest beforehand."""
    return sorted(units, key=unit_cost, reverse=True)


def rows_costliest_first(rows: list[RowSpec]) -> list[RowSpec]:
    """The manifest's rows in the order they are resolved and dispatched: the costliest first by what the
    manifest alone says (:func:`item_cost` of a square content), stable for equal costs (manifest order).

    Ordering units within a few chunks (:func:`costliest_first`) is not enough: a long row in the last
    chunk would still start last and keep one device busy while the rest wait. Every row's parameters are
    known once the manifest is read, so the whole run is put in longest-first order before any is resolved.
    A manifest whose rows all ask for the same work keeps its order."""
    return sorted(rows, key=lambda row: item_cost(row.params, None), reverse=True)


@dataclass
class DispatchPace:
    """How big units must be for the flow to keep every device fed, and how big they may be.

    The flow spends ``cost_s`` of its own time per unit (``submit_s`` submitting it and ``collect_s``
    collecting its outcome: with a dask runner, mostly Prefect's serialisation of the task run), and
    each item keeps a device busy ``item_s``. ``D`` devices finish ``D / item_s`` items a second, and
    the flow starts at most ``n / cost_s`` items a second with units of ``n``; so units need
    ``n >= D * cost_s / item_s``. :meth:`min_items` asks for twice that (headroom for slow moments).

    Big units cost at the end: the devices finish their last units up to a unit's time apart. With
    ``L`` items left, units of ``n`` take the flow ``L * cost_s / n`` to hand out and leave the run's
    end ragged by about ``n * item_s / 2``; their sum is least at ``n = sqrt(2 L cost_s / item_s)``,
    so units never grow past that (:meth:`min_items`): they shrink as the run nears its end, where a
    unit of one item would leave the devices waiting on the flow. Each figure is a running average
    (weight :data:`PACE_WEIGHT` on the newest) of what the run measured, per unit: the flow submits a
    whole window before it collects anything, and that burst is many units' cost, not one's.
    """

    submit_s: float = 0.0
    collect_s: float = 0.0
    item_s: float = 0.0

    @property
    def cost_s(self) -> float:
        return self.submit_s + self.collect_s

    def submitted(self, seconds: float) -> None:
        """The flow's time to submit one unit."""
        self.submit_s = _running_average(self.submit_s, seconds)

    def collected(self, seconds: float) -> None:
        """The flow's time to collect one unit's outcomes (settling them included)."""
        self.collect_s = _running_average(self.collect_s, seconds)

    def item_time(self, seconds: float) -> None:
        if seconds > 0:
            self.item_s = _running_average(self.item_s, seconds)

    def min_items(self, devices: int, items_left: int | None = None) -> int:
        """The fewest items a unit should hold, given ``devices`` and (when known) the ``items_left`` to dispatch."""
        if not self.cost_s or not self.item_s:
            return 1
        wanted = math.ceil(2 * devices * self.cost_s / self.item_s)
        if items_left is not None:
            wanted = min(wanted, math.floor(math.sqrt(2 * max(0, items_left) * self.cost_s / self.item_s)))
        return max(1, min(AUTO_MAX_ITEMS, wanted))


def _running_average(average: float, sample: float) -> float:
    return sample if not average else (1 - PACE_WEIGHT) * average + PACE_WEIGHT * sample


PACE_WEIGHT = 0.2


class ItemsInFlight:
    """The rows waiting on items this run is computing, so an item named by many rows (of any chunk)
    is computed once and every one of its rows gets its outcome."""

    def __init__(self) -> None:
        self._rows: dict[str, list[Work]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, resolved: list[Work | Outcome]) -> tuple[list[Work], list[Outcome]]:
        """A resolved chunk: (items to compute, one :class:`Work` each; outcomes known already).
        A row whose item is already in flight joins it instead."""
        new: list[Work] = []
        known: list[Outcome] = []
        for r in resolved:
            if isinstance(r, Outcome):
                known.append(r)
            elif r.item_id in self._rows:
                self._rows[r.item_id].append(r)
            else:
                self._rows[r.item_id] = [r]
                new.append(r)
        return new, known

    def settle(self, computed: list[Outcome]) -> list[Outcome]:
        """The outcomes of every row waiting on the ``computed`` items (which are no longer in flight)."""
        return [for_row(done, work) for done in computed for work in self._rows.pop(done.item_id, [])]


def for_row(done: Outcome, work: Work) -> Outcome:
    """The outcome of ``work``'s row, given the outcome of the computation it shares."""
    if done.row == work.row.row:
        return done
    return outcome_for_row(
        work.row, done.status, error=done.error, item_id=done.item_id, output_uri=done.output_uri,
        iterations=done.iterations, duration_s=done.duration_s, device=done.device, weights_id=done.weights_id,
        losses=done.losses, style_distance=done.style_distance, content_distance=done.content_distance,
    )  # fmt: skip
