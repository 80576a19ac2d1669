"""Items: content-addressed units of work and their stored outputs.

An item is one stylisation. Its id is the sha256 of a canonical JSON of
everything that determines the output image:

* the sha256 of every input file's bytes by role (``content``, ``style``,
  ``style_1``... for further styles, ``style_mask``, ``style_mask_1``...,
  ``init``),
* every parameter that changes the output (``StyleParams.identity()``: not
  ``device``, not progress settings),
* the weights id (``imagenet:IMAGENET1K_V1``, ``random:N`` or the sha256 of
  a weights file),
* :data:`~nst_core.version.ENGINE_VERSION`.

Outputs live under ``{output_uri}/items/{item_id}/`` (names: :mod:`nst_run.paths`); ``meta.json`` is written
last and is the mark of a finished item. With ``save_every``, snapshots of the
image as it forms are in ``snapshots/iter-NNNNN.png``, listed in order (paths
relative to the item folder) under ``meta.json``'s ``snapshots`` key.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nst_core import storage
from nst_core.params import StyleParams
from nst_core.version import ENGINE_VERSION
from nst_run.paths import LOSS_CSV, LOSS_PNG, ItemPaths, image_name

if TYPE_CHECKING:
    from nst_core.engine import StyleResult

OUTPUT_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def item_id(input_sha256: dict[str, str], params: StyleParams, weights_id: str) -> str:
    """Content address of an item (64 hex characters)."""
    canonical = json.dumps(
        {
            "engine_version": ENGINE_VERSION,
            "inputs": dict(sorted(input_sha256.items())),
            "params": params.identity(),
            "weights_id": weights_id,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def build_meta(
    *,
    item: str,
    row: dict[str, Any],
    params: StyleParams,
    inputs: dict[str, dict[str, str]],
    weights: str,
    weights_id: str,
    result: StyleResult,
    paths: ItemPaths,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a finished item (JSON-ready). Holds no credentials: URIs only."""
    return {
        "item_id": item,
        "engine_version": ENGINE_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "row": storage.sanitize_cells(row),  # manifest cells: credential-looking parts never stored
        "params": storage.sanitize_cells(params.model_dump(mode="json")),
        "inputs": inputs,
        "weights": {
            "spec": storage.sanitize_uri(weights),
            "id": weights_id,
            "random": weights_id.startswith("random:"),
            "note": "UNTRAINED RANDOM WEIGHTS (smoke run, not ImageNet VGG-19)" if weights_id.startswith("random:") else "",
        },
        "device": result.device,
        "precision": result.precision,
        "execution": result.execution,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "iterations": result.iterations,
        "stop_reason": result.stop_reason,
        "wall_time_s": round(result.wall_time_s, 4),
        "final_losses": result.final_losses,
        "outputs": {"image": image_name(paths.image_format), "loss_csv": LOSS_CSV, "loss_png": LOSS_PNG},
        **(extra or {}),
    }


def read_meta(paths: ItemPaths) -> dict[str, Any] | None:
    """The item's meta.json, or None when the item is not finished."""
    try:
        return json.loads(storage.read_bytes(paths.meta))
    except storage.ObjectNotFound:
        return None


def meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, indent=2, sort_keys=False, default=str).encode("utf-8")
