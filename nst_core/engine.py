"""The optimisation: find an image whose VGG-19 features match a content image
and whose Gram matrices match a style image (Gatys, Ecker & Bethge, 2015).

Read top to bottom:

1. :func:`style_targets` and :func:`content_targets` turn images into what the
   loss matches (computed once per image; callers may cache them).
2. :func:`initial_image` decides where the optimisation starts.
3. :func:`optimise` runs the loop over a batch of same-size items: forward,
   loss, backward, optimiser step, history, callback.
4. :func:`stylize` is the one-pair convenience: prepare images, run, package.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from nst_core import images
from nst_core.errors import ImageError
from nst_core.losses import GatysLoss, LossWeights, mean_gram
from nst_core.network import Network, load_network, min_image_side, resolve_device
from nst_core.optim import make_optimizer
from nst_core.params import StyleParams

ENGINE_VERSION = "1"
"""Algorithm version: bumped only when the same inputs would give a different image."""


class TimeLimitExceeded(RuntimeError):
    """The optimisation ran past its ``time_limit_s``."""


@dataclass(frozen=True)
class IterationInfo:
    """What a progress callback receives every ``progress_every`` iterations."""

    iteration: int  # evaluations done so far (1-based)
    iterations: int  # evaluations planned
    losses: list[dict[str, float]]  # per batch item: total, content, style, tv, style:<layer>
    elapsed_s: float
    image: Tensor  # the current batch [B, 3, H, W], detached (not clamped)


Callback = Callable[[IterationInfo], None]


@dataclass
class StyleResult:
    """One item's outcome."""

    image: Tensor  # [3, H, W] in [0, 1], on the CPU
    history: list[dict[str, float]]  # one row per evaluation: iteration, total, content, style, tv, style:<layer>
    iterations: int
    wall_time_s: float
    device: str
    weights_id: str
    params: StyleParams
    stop_reason: str = "iterations"
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def final_losses(self) -> dict[str, float]:
        return {k: v for k, v in self.history[-1].items() if k != "iteration"} if self.history else {}

    def to_pil(self) -> Image.Image:
        return images.to_pil(self.image)


def loss_weights(params: StyleParams) -> LossWeights:
    return LossWeights(
        content=params.content_weight,
        style=params.style_weight,
        tv=params.tv_weight,
        style_layers=params.layer_weights,
        content_layers=params.content_layers,
        normalization=params.loss_normalization,
    )


@torch.no_grad()
def style_targets(network: Network, style: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """Per-position Gram matrices ``A / M`` of a style image ``[3, H, W]``, each ``[1, N, N]``."""
    feats = network.features(style.unsqueeze(0).to(network.device), list(layers))
    return {name: mean_gram(feats[name]) for name in layers}


class StyleTargetCache:
    """Style targets kept across items (an LRU of ``max_entries``), keyed by everything they depend on.

    The key is the style tensor's bytes (so its size and scale), the layers, the
    network's weights id, pooling and device.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[object, ...], dict[str, Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, network: Network, style: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        digest = hashlib.sha256(style.contiguous().numpy().tobytes()).hexdigest()
        key = (digest, tuple(style.shape), tuple(layers), network.weights_id, network.features.pooling, str(network.device))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        targets = style_targets(network, style, layers)
        with self._lock:
            self.misses += 1
            self._entries[key] = targets
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return targets


@torch.no_grad()
def content_targets(network: Network, content: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """Features ``P`` of a content image ``[3, H, W]``, each ``[1, C, h, w]``."""
    feats = network.features(content.unsqueeze(0).to(network.device), list(layers))
    return {name: feats[name] for name in layers}


def initial_image(params: StyleParams, content: Tensor, style: Tensor | None = None, image: Tensor | None = None) -> Tensor:
    """The starting point ``[3, H, W]``: the content, white noise, the style or a given image.

    ``style`` and ``image`` must already have the content's height and width.
    """
    if params.init == "content":
        return content.clone()
    if params.init == "noise":
        generator = torch.Generator().manual_seed(params.seed)
        return torch.rand(content.shape, generator=generator)
    if params.init == "style":
        if style is None:
            raise ValueError("init='style' needs the style image resized to the content's size")
        return style.clone()
    if image is None:
        raise ValueError(f"init={params.init!r} names an image, but none was given")
    return image.clone()


def _rows(iteration: int, terms: dict[str, Tensor]) -> Tensor:
    """Stack a step's loss terms into ``[n_terms + 1, B]`` without leaving the device."""
    values = list(terms.values())
    it = torch.full_like(values[0], float(iteration))
    return torch.stack([it, *values]).detach()


def optimise(
    network: Network,
    params: StyleParams,
    init: Tensor,
    content: dict[str, Tensor],
    style: dict[str, Tensor],
    *,
    callback: Callback | None = None,
    time_limit_s: float | None = None,
) -> tuple[Tensor, list[list[dict[str, float]]], float]:
    """Optimise a batch ``init`` ``[B, 3, H, W]`` against per-item targets.

    ``content`` maps each content layer to ``[B|1, ...]`` features, ``style``
    each style layer to ``[B|1, N, N]`` per-position Grams. ``params``
    (everything but images and seed) is shared by the batch.

    ``params.iterations`` loss evaluations are made; the optimiser steps after
    each but the last, so the returned image is the one whose loss was
    measured last. Returns the images, each item's history and the wall time.
    Raises :class:`TimeLimitExceeded` past ``time_limit_s`` seconds.
    """
    start = time.perf_counter()
    loss_fn = GatysLoss(loss_weights(params), content, style)
    layers = loss_fn.weights.layers
    x = init.detach().to(network.device, torch.float32).clone().requires_grad_(True)
    optimizer = make_optimizer(params.optimizer, x, params.effective_lr)
    names: list[str] = []
    steps: list[Tensor] = []
    for i in range(1, params.iterations + 1):
        with torch.enable_grad():
            total, terms = loss_fn(network.features(x, layers), x)
            (grad,) = torch.autograd.grad(total.sum(), x)
        names = names or list(terms)
        steps.append(_rows(i, terms))
        if callback is not None and (i % params.progress_every == 0 or i == params.iterations):
            elapsed = time.perf_counter() - start
            callback(IterationInfo(i, params.iterations, _item_losses(names, steps[-1]), elapsed, x.detach()))
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            raise TimeLimitExceeded(f"timeout: stopped after {i} of {params.iterations} iterations ({time_limit_s:g} s limit)")
        if i < params.iterations:
            optimizer.step(x, grad)
    histories = _histories(["iteration", *names], steps, x.shape[0])
    return x.detach(), histories, time.perf_counter() - start


def _item_losses(names: list[str], row: Tensor) -> list[dict[str, float]]:
    values = row[1:].cpu().tolist()  # [n_terms][B]
    return [{name: values[k][b] for k, name in enumerate(names)} for b in range(row.shape[1])]


def _histories(names: list[str], steps: list[Tensor], batch: int) -> list[list[dict[str, float]]]:
    if not steps:
        return [[] for _ in range(batch)]
    table = torch.stack(steps).cpu().tolist()  # [T][n_terms+1][B]
    out: list[list[dict[str, float]]] = []
    for b in range(batch):
        rows = []
        for step in table:
            row = {name: step[k][b] for k, name in enumerate(names)}
            row["iteration"] = int(row["iteration"])
            rows.append(row)
        out.append(rows)
    return out


def prepare_images(
    params: StyleParams,
    content: Image.Image,
    style: Image.Image,
    init_image: Image.Image | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Resize content (long side ``size``), style (``size * style_scale``) and the start image.

    Returns content ``[3, H, W]``, style ``[3, h, w]`` and the start image ``[3, H, W]``.
    """
    content_t = images.resized_tensor(content, long_side=params.size)
    style_t = images.resized_tensor(style, long_side=max(1, round(params.size * params.style_scale)))
    min_side = min_image_side(params.content_layers + params.style_layers)
    images.check_min_side(content_t, min_side, "content image (after resizing to size)")
    images.check_min_side(style_t, min_side, "style image (after resizing to size * style_scale)")
    hw = (content_t.shape[2], content_t.shape[1])
    style_same = images.resized_tensor(style, exact=hw) if params.init == "style" else None
    init_t = images.resized_tensor(init_image, exact=hw) if init_image is not None else None
    if params.init_is_image and init_t is None:
        raise ImageError(f"init={params.init!r} names an image, but it was not loaded")
    return content_t, style_t, initial_image(params, content_t, style_same, init_t)


def stylize(
    content: Image.Image,
    style: Image.Image,
    params: StyleParams | None = None,
    *,
    init_image: Image.Image | None = None,
    network: Network | None = None,
    weights_path: str | None = None,
    callback: Callback | None = None,
    cache: StyleTargetCache | None = None,
    time_limit_s: float | None = None,
) -> StyleResult:
    """Stylise one content image with one style image.

    Images are RGB PIL images (see :func:`nst_core.images.load_image`).
    ``network`` defaults to the cached VGG-19 for ``params.weights``;
    ``weights_path`` is the local copy of a remote weights file; ``cache``
    reuses style targets across calls.
    """
    params = params or StyleParams()
    if network is None:
        network = load_network(
            params.weights,
            pooling=params.pooling,
            device=resolve_device(params.device),
            weights_path=weights_path,
            weights_sha256=params.weights_sha256,
        )
    content_t, style_t, init_t = prepare_images(params, content, style, init_image)
    p_content = content_targets(network, content_t, params.content_layers)
    if cache is not None:
        a_style = cache.get(network, style_t, params.style_layers)
    else:
        a_style = style_targets(network, style_t, params.style_layers)
    out, histories, wall = optimise(
        network, params, init_t.unsqueeze(0), p_content, a_style, callback=callback, time_limit_s=time_limit_s
    )
    return StyleResult(
        image=out[0].clamp(0, 1).cpu(),
        history=histories[0],
        iterations=len(histories[0]),
        wall_time_s=wall,
        device=str(network.device),
        weights_id=network.weights_id,
        params=params,
    )
