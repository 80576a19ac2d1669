"""Prefect tasks: thin wrappers that call the engine and storage.

* :func:`read_manifest`: read and validate a manifest.
* :func:`resolve_items`: hash each row's inputs, compute its ``item_id`` and
  see whether the item is already done (``meta.json`` present).
* :func:`stylize_item`: fetch, optimise, write the outputs, ``meta.json`` last.

Transient storage errors raise, so Prefect retries the task; every other
failure of an item is returned as a ``failed`` outcome with its reason, so one
bad item never stops the others.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from nst_core import engine, history, images, items, quality, storage
from nst_core.errors import NSTError
from nst_core.manifest import InvalidRow, Manifest, RowSpec, load_manifest
from nst_core.network import WeightsSpec, load_network, resolve_device
from nst_core.params import StyleParams

STATUSES = ("succeeded", "cached", "failed", "invalid")


@dataclass(frozen=True)
class Work:
    """A resolved row: its item id and the hashes of its inputs."""

    row: RowSpec
    item_id: str
    input_sha256: dict[str, str]
    weights_id: str
    weights_path: str | None = None


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


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only storage errors that may go away."""
    try:
        state.result()
    except storage.StorageError as exc:
        return exc.transient
    except Exception:
        return False
    return False


# --- manifest ---------------------------------------------------------------------------


@task(name="read-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)
def read_manifest(manifest_uri: str, defaults: StyleParams, allow_local_paths: bool, max_items: int | None) -> Manifest:
    return load_manifest(manifest_uri, defaults=defaults, allow_local_paths=allow_local_paths, max_items=max_items)


# --- resolving ----------------------------------------------------------------------------


def _weights_identity(params: StyleParams) -> tuple[str, str | None]:
    """(weights id, local path) without loading a network; files are fetched and hashed."""
    from nst_core.network import sha256_file, weights_id

    spec = WeightsSpec.parse(params.weights)
    if spec.kind != "file":
        return weights_id(params.weights), None
    local = str(storage.fetch_to_cache(params.weights))
    digest = sha256_file(local)
    if params.weights_sha256 and digest != params.weights_sha256.lower():
        raise NSTError(f"weights {storage.sanitize_uri(params.weights)}: sha256 is {digest}, expected {params.weights_sha256}")
    return "sha256:" + digest, local


@task(name="resolve-items", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)
def resolve_items(rows: list[RowSpec], output_uri: str, force: bool, workers: int = 8) -> list[Work | Outcome]:
    """Hash every row's inputs (each distinct URI once), compute item ids, detect finished items.

    Returns, per row, a :class:`Work` to do or an :class:`Outcome` (``cached``,
    or ``failed`` when an input cannot be read).
    """
    uris = sorted({uri for row in rows for uri in row.input_uris().values()})

    def digest(uri: str) -> tuple[str, str | Exception]:
        try:
            return uri, storage.sha256_bytes(storage.read_bytes(uri))
        except storage.StorageError as exc:
            if exc.transient:
                raise
            return uri, exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = dict(pool.map(digest, uris))
    weights: dict[str, tuple[str, str | None] | Exception] = {}
    resolved: list[Work | Outcome] = []
    for row in rows:
        missing = [f"{role} {exc}" for role, uri in row.input_uris().items() if isinstance(exc := hashes[uri], Exception)]
        if missing:
            resolved.append(outcome_for_row(row, "failed", error="; ".join(missing)))
            continue
        if row.params.weights not in weights:
            try:
                weights[row.params.weights] = _weights_identity(row.params)
            except (storage.StorageError, NSTError) as exc:
                weights[row.params.weights] = exc
        ident = weights[row.params.weights]
        if isinstance(ident, Exception):
            resolved.append(outcome_for_row(row, "failed", error=str(ident)))
            continue
        sha = {role: str(hashes[uri]) for role, uri in row.input_uris().items()}
        work = Work(row, items.item_id(sha, row.params, ident[0]), sha, ident[0], ident[1])
        resolved.append(work)
    todo = [w for w in resolved if isinstance(w, Work)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        metas = list(pool.map(lambda w: None if force else items.read_meta(_paths(w, output_uri)), todo))
    done = {w.item_id: meta for w, meta in zip(todo, metas, strict=True) if meta is not None}
    return [cached_outcome(r, output_uri, done[r.item_id]) if isinstance(r, Work) and r.item_id in done else r for r in resolved]


def _paths(work: Work, output_uri: str) -> items.ItemPaths:
    return items.ItemPaths(output_uri, work.item_id, work.row.params.output_format)


def cached_outcome(work: Work, output_uri: str, meta: dict[str, Any], status: str = "cached") -> Outcome:
    return outcome_for_row(
        work.row,
        status,
        item_id=work.item_id,
        output_uri=_paths(work, output_uri).image,
        iterations=int(meta.get("iterations", 0)),
        duration_s=float(meta.get("wall_time_s", 0.0)),
        device=str(meta.get("device", "")),
        weights_id=str(meta.get("weights", {}).get("id", work.weights_id)),
        losses=dict(meta.get("final_losses", {})),
        style_distance=meta.get("quality", {}).get("style_distance"),
        content_distance=meta.get("quality", {}).get("content_distance"),
    )


# --- stylising ------------------------------------------------------------------------------

# One optimisation at a time per device in this process: storage work of other
# items (fetching, uploading) overlaps with it, compute does not oversubscribe.
_DEVICE_SLOTS = threading.BoundedSemaphore(max(1, torch.cuda.device_count()))
STYLE_CACHE = engine.StyleTargetCache()


def _fetch_images(work: Work) -> dict[str, Any]:
    loaded = {}
    for role, uri in work.row.input_uris().items():
        data = storage.read_bytes(uri)
        if storage.sha256_bytes(data) != work.input_sha256[role]:
            raise NSTError(f"{role} {storage.sanitize_uri(uri)} changed during the run (sha256 differs); re-run to pick it up")
        loaded[role] = images.load_image(data, name=storage.sanitize_uri(uri), max_pixels=work.row.params.max_pixels)
    return loaded


@task(name="stylize-item", tags=["gpu"], cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def stylize_item(work: Work, output_uri: str, time_limit_s: float | None = None) -> Outcome:
    """Stylise one item and store its outputs; ``meta.json`` is written last."""
    row, params = work.row, work.row.params
    paths = _paths(work, output_uri)
    try:
        loaded = _fetch_images(work)
        with _DEVICE_SLOTS:
            network = load_network(
                params.weights,
                pooling=params.pooling,
                device=resolve_device(params.device),
                weights_path=work.weights_path,
                weights_sha256=params.weights_sha256,
            )
            result = engine.stylize(
                loaded["content"],
                loaded["style"],
                params,
                init_image=loaded.get("init"),
                network=network,
                cache=STYLE_CACHE,
                time_limit_s=time_limit_s,
            )
            # Judged by a VGG-19 with other weights than the optimised one (see nst_core.quality).
            score = quality.measure_result(result.image, loaded["content"], loaded["style"], params, result.weights_id, network.device)
    except storage.StorageError as exc:
        if exc.transient:
            raise
        return outcome_for_row(row, "failed", error=str(exc), item_id=work.item_id)
    except (NSTError, engine.TimeLimitExceeded, ValueError) as exc:
        return outcome_for_row(row, "failed", error=str(exc).splitlines()[0], item_id=work.item_id)
    except torch.OutOfMemoryError:
        return outcome_for_row(row, "failed", error="out_of_memory", item_id=work.item_id)
    label = f"{row.id}  weights={result.weights_id}"
    storage.write_bytes(paths.image, images.encode(result.to_pil(), params.output_format), items.OUTPUT_CONTENT_TYPES[params.output_format])
    storage.write_bytes(paths.loss_csv, history.to_csv(result.history), "text/csv")
    storage.write_bytes(paths.loss_png, history.to_png(result.history, label), "image/png")
    inputs = {role: {"uri": storage.sanitize_uri(uri), "sha256": work.input_sha256[role]} for role, uri in row.input_uris().items()}
    meta = items.build_meta(
        item=work.item_id,
        row={"row": row.row, "id": row.id, "content_uri": storage.sanitize_uri(row.content_uri),
             "style_uri": storage.sanitize_uri(row.style_uri), **row.overrides, **row.meta},
        params=params,
        inputs=inputs,
        weights=params.weights,
        weights_id=result.weights_id,
        result=result,
        paths=paths,
        extra={"quality": score.as_dict()},
    )
    storage.write_bytes(paths.meta, items.meta_bytes(meta), "application/json")  # last: the item is done
    get_run_logger().info("item %s (row %s) done in %.1f s on %s", row.id, row.row, result.wall_time_s, result.device)
    return cached_outcome(work, output_uri, meta, status="succeeded")
