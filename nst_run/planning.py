"""Planning a run, as plain functions: rows resolved to items, items grouped into batches.

* :class:`Work`: a row to compute (its ``item_id``, input hashes, weights id, content size);
  :class:`Outcome`: what happened to a row (one line of the results table).
* :func:`resolve_items`: hash each row's inputs (each distinct URI once), compute ``item_id``,
  see whether the item is already done (``meta.json`` present: ``cached``).
* :func:`plan_batches`: compatible items (same parameters and sizes) in batches; :func:`for_row`
  the outcome of each row from the computation it shares.

No Prefect and no torch here: ``nst validate`` resolves a manifest with these functions, and
the tasks (``tasks.steps``) wrap them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from nst_core import images, storage
from nst_core.errors import NSTError
from nst_core.params import StyleParams
from nst_core.weights import WeightsSpec, sha256_file, weights_id
from nst_run import items
from nst_run.manifest import InvalidRow, RowSpec
from nst_run.paths import ItemPaths


@dataclass(frozen=True)
class Work:
    """A resolved row: its item id and the hashes of its inputs."""

    row: RowSpec
    item_id: str
    input_sha256: dict[str, str]
    weights_id: str
    weights_path: str | None = None
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


def _weights_identity(weights: str) -> tuple[str, str | None]:
    """(weights id, local path) of a weights spec without loading a network; files are fetched and hashed."""
    spec = WeightsSpec.parse(weights)
    if spec.kind != "file":
        return weights_id(weights), None
    local = str(storage.fetch_to_cache(weights))
    return "sha256:" + sha256_file(local), local


def _check_weights_sha256(params: StyleParams, weights_id: str) -> None:
    """The row's own ``weights_sha256`` against the file's id (checked per row: the id is cached per URI)."""
    expected = (params.weights_sha256 or "").lower()
    if expected and weights_id != "sha256:" + expected:
        digest = weights_id.removeprefix("sha256:")
        raise NSTError(f"weights {storage.sanitize_uri(params.weights)}: sha256 is {digest}, expected {params.weights_sha256}")


def resolve_items(rows: list[RowSpec], output_uri: str, force: bool, workers: int = 8) -> list[Work | Outcome]:
    """Hash every row's inputs (each distinct URI once), compute item ids, detect finished items.

    Returns, per row, a :class:`Work` to do or an :class:`Outcome` (``cached``,
    or ``failed`` when an input cannot be read).
    """
    limits: dict[str, int] = {}  # per distinct input: the largest file a row using it accepts
    for row in rows:
        for uri in row.input_uris().values():
            limits[uri] = max(limits.get(uri, 0), images.max_file_bytes(row.params.max_pixels))
    uris = sorted(limits)

    def digest(uri: str) -> tuple[str, str | Exception, tuple[int, int] | None]:
        try:
            data = storage.read_bytes(uri, max_bytes=limits[uri])
        except storage.StorageError as exc:
            if exc.transient:
                raise
            return uri, exc, None
        return uri, storage.sha256_bytes(data), images.header_size(data)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(digest, uris))
    hashes = {uri: sha for uri, sha, _ in found}
    sizes = {uri: size for uri, _, size in found}
    weights: dict[str, tuple[str, str | None] | Exception] = {}
    resolved: list[Work | Outcome] = []
    for row in rows:
        missing = [f"{role} {exc}" for role, uri in row.input_uris().items() if isinstance(exc := hashes[uri], Exception)]
        if missing:
            resolved.append(outcome_for_row(row, "failed", error="; ".join(missing)))
            continue
        if row.params.weights not in weights:
            try:
                weights[row.params.weights] = _weights_identity(row.params.weights)
            except (storage.StorageError, NSTError) as exc:
                weights[row.params.weights] = exc
        ident = weights[row.params.weights]
        try:
            if isinstance(ident, Exception):
                raise ident
            _check_weights_sha256(row.params, ident[0])
        except (storage.StorageError, NSTError) as exc:
            resolved.append(outcome_for_row(row, "failed", error=str(exc)))
            continue
        sha = {role: str(hashes[uri]) for role, uri in row.input_uris().items()}
        work = Work(row, items.item_id(sha, row.params, ident[0]), sha, ident[0], ident[1], sizes[row.content_uri])
        resolved.append(work)
    todo = [w for w in resolved if isinstance(w, Work)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        metas = list(pool.map(lambda w: None if force else items.read_meta(item_paths(w, output_uri)), todo))
    done = {w.item_id: meta for w, meta in zip(todo, metas, strict=True) if meta is not None}
    return [cached_outcome(r, output_uri, done[r.item_id]) if isinstance(r, Work) and r.item_id in done else r for r in resolved]


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


def plan_batches(works: list[Work], batch_size: int, auto_size: Callable[[Work], int] = lambda work: 1) -> list[list[Work]]:
    """Group compatible items (same parameters, same size at every stage) into batches of at most ``batch_size``.

    Args:
        works: distinct items (one per item id).
        batch_size: the most items per batch; 0 picks one per group with ``auto_size``.
        auto_size: a group's batch size from its first item (default 1: no batching). The flow
            passes :func:`nst_run.execute.auto_batch_size`: 1 on a CPU-only machine, as batching
            does not speed up a compute-bound CPU, else what the first GPU's free memory holds.
    """
    groups: dict[tuple[object, ...], list[Work]] = {}
    for work in works:
        groups.setdefault(work.batch_key(), []).append(work)
    batches: list[list[Work]] = []
    for group in groups.values():
        size = batch_size or auto_size(group[0])
        batches += chunks(group, max(1, size))
    return batches


def for_row(done: Outcome, work: Work) -> Outcome:
    """The outcome of ``work``'s row, given the outcome of the computation it shares."""
    if done.row == work.row.row:
        return done
    return outcome_for_row(
        work.row, done.status, error=done.error, item_id=done.item_id, output_uri=done.output_uri,
        iterations=done.iterations, duration_s=done.duration_s, device=done.device, weights_id=done.weights_id,
        losses=done.losses, style_distance=done.style_distance, content_distance=done.content_distance,
    )  # fmt: skip
