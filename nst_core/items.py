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
* :data:`~nst_core.engine.ENGINE_VERSION`.

Outputs live under ``{output_uri}/items/{item_id}/``; ``meta.json`` is written
last and is the mark of a finished item. With ``save_every``, snapshots of the
image as it forms are in ``snapshots/iter-NNNNN.png``, listed in order (paths
relative to the item folder) under ``meta.json``'s ``snapshots`` key.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nst_core import storage
from nst_core.engine import ENGINE_VERSION, StyleResult
from nst_core.params import StyleParams

META_FILE = "meta.json"
SNAPSHOT_FOLDER = "snapshots"
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


@dataclass(frozen=True)
class ItemPaths:
    """Where one item's files live."""

    output_uri: str
    item_id: str
    image_format: str = "png"

    @property
    def folder(self) -> str:
        return storage.join(self.output_uri, "items", self.item_id)

    @property
    def image(self) -> str:
        ext = {"jpeg": "jpg"}.get(self.image_format, self.image_format)
        return storage.join(self.folder, f"stylized.{ext}")

    @property
    def loss_csv(self) -> str:
        return storage.join(self.folder, "loss.csv")

    @property
    def loss_png(self) -> str:
        return storage.join(self.folder, "loss.png")

    @property
    def meta(self) -> str:
        return storage.join(self.folder, META_FILE)

    @staticmethod
    def snapshot_name(iteration: int) -> str:
        """A snapshot's path relative to the item folder (as ``meta.json``'s ``snapshots`` lists it)."""
        return f"{SNAPSHOT_FOLDER}/iter-{iteration:05d}.png"


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
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "iterations": result.iterations,
        "stop_reason": result.stop_reason,
        "wall_time_s": round(result.wall_time_s, 4),
        "final_losses": result.final_losses,
        "outputs": {"image": "stylized." + paths.image.rsplit(".", 1)[-1], "loss_csv": "loss.csv", "loss_png": "loss.png"},
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
