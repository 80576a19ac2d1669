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
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from nst_core import images
from nst_core.errors import ImageError
from nst_core.losses import GatysLoss, LossWeights, mean_gram
from nst_core.network import Network, load_network, min_image_side, resolve_device
from nst_core.optim import LBFGS_HISTORY, make_optimizer
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
        return {k: v for k, v in self.history[-1].items() if k not in ("iteration", "size")} if self.history else {}

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
    feats = features(network, style.unsqueeze(0).to(network.device), list(layers))
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
    feats = features(network, content.unsqueeze(0).to(network.device), list(layers))
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


TOLERANCE_WINDOW = 10
"""Early stopping compares an item's total loss with its value this many iterations earlier."""


def _rows(iteration: int, terms: dict[str, Tensor]) -> Tensor:
    """Stack a step's loss terms into ``[n_terms + 1, B]`` without leaving the device."""
    values = list(terms.values())
    it = torch.full_like(values[0], float(iteration))
    return torch.stack([it, *values]).detach()


def features(network: Network, x: Tensor, layers: Sequence[str] | frozenset[str]) -> dict[str, Tensor]:
    """The network's features of ``x``; on CUDA the convolutions run in bf16, the results return as fp32."""
    if network.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            feats = network.features(x.contiguous(memory_format=torch.channels_last), layers)
        return {name: f.float() for name, f in feats.items()}
    return network.features(x, layers)


@dataclass
class Optimised:
    """What :func:`optimise` returns for a batch."""

    images: Tensor  # [B, 3, H, W], on the device, not clamped
    histories: list[list[dict[str, float]]]
    stop_iterations: list[int]  # per item: the evaluation it stopped at
    stop_reasons: list[str]
    wall_time_s: float


def optimise(
    network: Network,
    params: StyleParams,
    init: Tensor,
    content: dict[str, Tensor],
    style: dict[str, Tensor],
    *,
    iterations: int | None = None,
    callback: Callback | None = None,
    time_limit_s: float | None = None,
    first_iteration: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Optimised:
    """Optimise a batch ``init`` ``[B, 3, H, W]`` against per-item targets.

    ``content`` maps each content layer to ``[B|1, ...]`` features, ``style``
    each style layer to ``[B|1, N, N]`` per-position Grams. ``params``
    (everything but images and seed) is shared by the batch.

    ``iterations`` (default ``params.iterations``) loss evaluations are made;
    the optimiser steps after each but the last, so the returned image is the
    one whose loss was measured last. With ``params.tolerance`` > 0 an item
    stops once its total loss fell by less than that fraction over
    :data:`TOLERANCE_WINDOW` iterations; a stopped item's pixels no longer
    change (the batch runs on while any item is active), so an item's result
    does not depend on its batch. Raises :class:`TimeLimitExceeded` past
    ``time_limit_s`` seconds.
    """
    start = time.perf_counter()
    n_iterations = params.iterations if iterations is None else iterations
    loss_fn = GatysLoss(loss_weights(params), content, style)
    layers = loss_fn.weights.layers
    x = init.detach().to(network.device, dtype).clone().requires_grad_(True)
    batch = x.shape[0]
    optimizer = make_optimizer(params.optimizer, x, params.effective_lr)
    names: list[str] = []
    steps: list[Tensor] = []
    best: list[Tensor] = []
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    stop_at = [n_iterations] * batch
    reasons = ["iterations"] * batch
    last = first_iteration + n_iterations - 1
    for k, i in enumerate(range(first_iteration, last + 1), start=1):
        with torch.enable_grad():
            total, terms = loss_fn(features(network, x, layers), x)
            (grad,) = torch.autograd.grad(total.sum(), x)
        names = names or list(terms)
        steps.append(_rows(i, terms))
        if callback is not None and (i % params.progress_every == 0 or i == last):
            elapsed = time.perf_counter() - start
            callback(IterationInfo(i, last, _item_losses(names, steps[-1]), elapsed, x.detach()))
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            raise TimeLimitExceeded(f"timeout: stopped after {i} of {last} iterations ({time_limit_s:g} s limit)")
        best.append(steps[-1][1] if not best else torch.minimum(best[-1], steps[-1][1]))  # row 1: total loss
        if params.tolerance > 0 and k > TOLERANCE_WINDOW and k % TOLERANCE_WINDOW == 0:
            # The best loss so far, now and a window ago: a passing uphill step of L-BFGS does not stop an item.
            now, before = best[-1], best[-1 - TOLERANCE_WINDOW]
            converged = (before - now) <= params.tolerance * before.abs()
            newly = (converged & active).cpu().tolist()
            for b, done in enumerate(newly):
                if done:
                    stop_at[b] = k
                    reasons[b] = f"converged: best total loss improved < {params.tolerance:g} over {TOLERANCE_WINDOW} iterations"
            active = active & ~converged
            if not bool(active.any()):
                break
        if k < n_iterations:
            frozen = x.detach()[~active].clone() if not bool(active.all()) else None
            optimizer.step(x, grad)
            if frozen is not None:
                with torch.no_grad():
                    x[~active] = frozen
    histories = _histories(["iteration", *names], steps, batch)
    histories = [h[: stop_at[b]] for b, h in enumerate(histories)]
    return Optimised(x.detach(), histories, stop_at, reasons, time.perf_counter() - start)


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
    long_side: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Resize content (long side ``long_side``, default ``size``), style (that times ``style_scale``) and the start.

    Returns content ``[3, H, W]``, style ``[3, h, w]`` and the start image ``[3, H, W]``.
    """
    side = long_side or params.size
    content_t = images.resized_tensor(content, long_side=side)
    style_t = images.resized_tensor(style, long_side=max(1, round(side * params.style_scale)))
    min_side = min_image_side(params.content_layers + params.style_layers)
    images.check_min_side(content_t, min_side, "content image (after resizing to size)")
    images.check_min_side(style_t, min_side, "style image (after resizing to size * style_scale)")
    hw = (content_t.shape[2], content_t.shape[1])
    style_same = images.resized_tensor(style, exact=hw) if params.init == "style" else None
    init_t = images.resized_tensor(init_image, exact=hw) if init_image is not None else None
    if params.init_is_image and init_t is None:
        raise ImageError(f"init={params.init!r} names an image, but it was not loaded")
    return content_t, style_t, initial_image(params, content_t, style_same, init_t)


@dataclass(frozen=True)
class Job:
    """One item of a batch: its images and its own parameters (batch-compatible with the others)."""

    content: Image.Image
    style: Image.Image
    params: StyleParams
    init_image: Image.Image | None = None


def output_size(content: Image.Image, long_side: int) -> tuple[int, int]:
    """(height, width) the engine optimises at for this content image."""
    width, height = images.fitted_size(*content.size, long_side)
    return height, width


def _stack_targets(per_item: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {name: torch.cat([t[name] for t in per_item]) for name in per_item[0]}


def estimate_item_bytes(height: int, width: int, params: StyleParams) -> int:
    """Rough device memory one item of a batch needs at ``height`` x ``width`` (for choosing batch sizes).

    Activations kept for the backward pass (two per conv layer, up to relu5_1;
    channels x pixels per block), their gradients, and the L-BFGS history.
    """
    pixels = height * width
    per_block = [(64, 2, 1), (128, 2, 4), (256, 4, 16), (512, 4, 64), (512, 1, 256)]  # channels, convs, downsampling^2
    activations = sum(ch * convs * 2 * pixels // down for ch, convs, down in per_block)
    history = 2 * LBFGS_HISTORY * 3 * pixels if params.optimizer == "lbfgs" else 2 * 3 * pixels
    return int(4 * (2 * activations + history) * 1.25)


def stylize_batch(
    jobs: Sequence[Job],
    *,
    network: Network | None = None,
    weights_path: str | None = None,
    callback: Callback | None = None,
    cache: StyleTargetCache | None = None,
    time_limit_s: float | None = None,
) -> list[StyleResult]:
    """Stylise several same-size items in one optimisation (one forward/backward per iteration for all).

    The jobs' parameters must agree on :meth:`StyleParams.batch_key` and their
    content images must resize to the same height and width. Each item's
    result equals what it gets alone, up to floating-point reassociation.
    Coarse-to-fine (``params.scales``): each stage optimises at its size,
    starting from the previous stage's result upsampled.
    """
    if not jobs:
        return []
    params = jobs[0].params
    if any(job.params.batch_key() != params.batch_key() for job in jobs):
        raise ValueError("items of a batch must share every parameter but seed, init and output_format")
    if network is None:
        network = load_network(
            params.weights,
            pooling=params.pooling,
            device=resolve_device(params.device),
            weights_path=weights_path,
            weights_sha256=params.weights_sha256,
        )
    started = time.perf_counter()
    x: Tensor | None = None
    histories: list[list[dict[str, float]]] = [[] for _ in jobs]
    reasons = ["iterations"] * len(jobs)
    done_iterations = 0
    for long_side, stage_iterations in params.stages:
        prepared = [prepare_images(job.params, job.content, job.style, job.init_image, long_side) for job in jobs]
        shapes = {tuple(c.shape) for c, _, _ in prepared}
        if len(shapes) != 1:
            raise ValueError(f"items of a batch must have the same size at {long_side} px, got {sorted(shapes)}")
        p_content = _stack_targets([content_targets(network, c, params.content_layers) for c, _, _ in prepared])
        get_style = cache.get if cache is not None else style_targets
        a_style = _stack_targets([get_style(network, st, params.style_layers) for _, st, _ in prepared])
        if x is None:
            start_images = torch.stack([init for _, _, init in prepared])
        else:  # coarse-to-fine: continue from the previous stage's result
            size = prepared[0][0].shape[-2:]
            start_images = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False).clamp(0, 1)
        remaining = None if time_limit_s is None else time_limit_s - (time.perf_counter() - started)
        run = optimise(
            network, params, start_images, p_content, a_style,
            iterations=stage_iterations, callback=callback, time_limit_s=remaining, first_iteration=done_iterations + 1,
        )  # fmt: skip
        for b, rows in enumerate(run.histories):
            histories[b] += [{**row, "size": long_side} for row in rows] if len(params.stages) > 1 else rows
        reasons = run.stop_reasons
        done_iterations += stage_iterations
        x = run.images
    assert x is not None
    wall = time.perf_counter() - started
    return [
        StyleResult(
            image=x[b].clamp(0, 1).cpu(),
            history=histories[b],
            iterations=len(histories[b]),
            wall_time_s=wall,
            device=str(network.device),
            weights_id=network.weights_id,
            params=job.params,
            stop_reason=reasons[b],
            extra={"batch_size": len(jobs)},
        )
        for b, job in enumerate(jobs)
    ]


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
    """Stylise one content image with one style image (a batch of one).

    Images are RGB PIL images (see :func:`nst_core.images.load_image`).
    ``network`` defaults to the cached VGG-19 for ``params.weights``;
    ``weights_path`` is the local copy of a remote weights file; ``cache``
    reuses style targets across calls.
    """
    job = Job(content, style, params or StyleParams(), init_image)
    return stylize_batch(
        [job], network=network, weights_path=weights_path, callback=callback, cache=cache, time_limit_s=time_limit_s
    )[0]
