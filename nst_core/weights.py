"""The ``weights`` parameter parsed and identified, without loading a network (no torch here).

``imagenet`` and ``random:N`` name themselves; a state-dict file is named by the sha256 of its bytes.
Loading is :func:`nst_core.network.load_network`'s.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

MAX_RANDOM_SEED = 2**63  # random:N takes 0 <= N < 2**63, as the seed parameter does


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed ``weights`` parameter: kind is ``imagenet``, ``random`` or ``file``."""

    kind: str
    seed: int | None = None
    path: str | None = None

    @staticmethod
    def parse(text: str) -> WeightsSpec:
        text = text.strip()
        if text == "imagenet":
            return WeightsSpec("imagenet")
        if text.startswith("random:"):
            seed = text.removeprefix("random:")
            if not (seed.isascii() and seed.isdigit()) or int(seed) >= MAX_RANDOM_SEED:
                # torch's generator takes 64-bit seeds: a larger one would pass here and fail in the flow
                raise ValueError(f"weights {text!r}: 'random:' must be followed by a non-negative integer seed below 2**63")
            return WeightsSpec("random", seed=int(seed))
        if not text:
            raise ValueError("weights must not be empty")
        return WeightsSpec("file", path=text)

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_id(weights: str, local_path: str | None = None) -> str:
    """A stable identifier of the weights, for metadata and ``item_id``.

    ``imagenet`` and ``random:N`` name themselves; a file is named by the sha256
    of its bytes, so the same file reached by two URIs has one id.
    """
    spec = WeightsSpec.parse(weights)
    if spec.kind == "imagenet":
        return "imagenet:IMAGENET1K_V1"
    if spec.kind == "random":
        return f"random:{spec.seed}"
    return "sha256:" + sha256_file(local_path or spec.path or "")
