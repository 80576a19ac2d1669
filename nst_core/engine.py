"""The optimisation: find an image whose VGG-19 features match a content image
and whose Gram matrices match a style image (Gatys, Ecker & Bethge, 2015).

Read top to bottom:

1. :func:`style_targets` and :func:`content_targets` turn images into what the
   loss matches (computed once per image; callers may cache them).
2. :func:`initial_image` decides where the optimisation starts.
3. :func:`optimise` runs the loop over a batch of same-size items: forward,
   loss, backward, optimiser step, history, callback; per item it keeps the
   best image (the one returned) and guards against L-BFGS divergence.
4. :func:`stylize_batch` prepares each stage's images (:func:`stage_inputs`:
   sizes, masks, colour modes of :mod:`nst_core.color`), the targets (several
   styles blended, or guided by masks: :func:`batch_style_targets`), runs
   :func:`optimise` per coarse-to-fine stage and packages the results (with
   snapshots every ``save_every`` iterations); :func:`stylize` is the one-pair
   convenience.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from nst_core import color, images
from nst_core.errors import ImageError
from nst_core.execution import EAGER_NCHW, Execution, choose_batch_size, choose_execution, features
from nst_core.layers import layer_channels, min_image_side
from nst_core.losses import GatysLoss, LossWeights, StyleGuidance, blend_grams, mean_gram
from nst_core.network import Network, load_network, resolve_device, resolve_precision
from nst_core.optim import LBFGS_HISTORY, make_optimizer
from nst_core.params import StyleInputsError, StyleParams, input_role


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
SnapshotHook = Callable[[int, Tensor], None]
"""Called after every evaluation with the iteration number and the batch ``[B, 3, H, W]`` it evaluated."""


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
    precision: str = "fp32"  # how the network computed: "fp32" or "bf16" (params.precision resolved on the device)
    execution: str = "nchw"  # how the trunk ran, measured per device and shape (nst_core.execution); "a|b" per stage
    stop_reason: str = "iterations"
    extra: dict[str, object] = field(default_factory=dict)
    snapshots: list[tuple[int, Image.Image]] = field(default_factory=list)  # (iteration, image) every save_every
    image_iteration: int | None = None  # the evaluation whose image ``image`` is (its lowest loss); None: the last
    _pil: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def final_losses(self) -> dict[str, float]:
        """The loss terms of the returned image: its history row (``image_iteration``; else the last row)."""
        if not self.history:
            return {}
        row = next((r for r in self.history if r["iteration"] == self.image_iteration), self.history[-1])
        return {k: v for k, v in row.items() if k not in ("iteration", "size")}

    def to_pil(self) -> Image.Image:
        """The image as RGB (converted once: callers convert on the device's thread, see nst_run.execute.DevicePool)."""
        if self._pil is None:
            self._pil = images.to_pil(self.image)
        return self._pil


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

    The key is the style tensor's bytes (so its size and scale, and any colour
    transform applied to it before: ``color=luminance|histogram`` make the
    style depend on the content, and the transformed bytes say so), the
    layers, the network's weights id, normalisation, pooling, device and precision.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[object, ...], dict[str, Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, network: Network, style: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        digest = hashlib.sha256(style.contiguous().numpy().tobytes()).hexdigest()
        key = (
            digest, tuple(style.shape), tuple(layers), network.weights_id, network.normalized,
            network.features.pooling, str(network.device), network.precision,
        )  # fmt: skip
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
def content_targets(network: Network, content: Tensor, layers: Sequence[str], execution: Execution = EAGER_NCHW) -> dict[str, Tensor]:
    """Features ``P`` of a content image ``[3, H, W]``, each ``[1, C, h, w]``.

    ``execution``: the way the optimisation will run the trunk on images of this size
    (:func:`nst_core.execution.choose_execution`), so that starting from the content image gives a
    content loss of exactly zero: another layout rounds differently in bf16.
    """
    feats = features(network, content.unsqueeze(0).to(network.device), list(layers), execution)
    return {name: feats[name].float() for name in layers}  # P in float32: the content loss subtracts in float32


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

DIVERGENCE_FACTOR = 2.0
"""The divergence guard: an item whose total loss exceeds this many times its best so far has diverged."""


def checks_convergence(k: int) -> bool:
    """Whether the early-stopping rule is checked after an item's ``k``-th evaluation (1-based) of a stage."""
    return k > TOLERANCE_WINDOW and k % TOLERANCE_WINDOW == 0


def converged(best_now: Tensor, best_before: Tensor, tolerance: float) -> Tensor:
    """The early-stopping rule, per item: the best total loss so far fell by at most ``tolerance`` of
    its value :data:`TOLERANCE_WINDOW` evaluations ago (best losses, so a passing uphill step of
    L-BFGS does not stop an item)."""
    return (best_before - best_now) <= tolerance * best_before.abs()


def stop_iteration(totals: Sequence[float], tolerance: float) -> int:
    """The evaluation at which :func:`optimise` stops a lone item whose total losses are ``totals``.

    What the rule would do, without running it: on the CPU a lone item's early-stopped run is the
    start of its run without early stopping, bit for bit, so ``benchmarks/multiscale.py`` reads every
    tolerance's stop off one full run. ``len(totals)`` when it never stops.
    """
    best = torch.tensor(totals, dtype=torch.float32).cummin(0).values  # the engine keeps float32 totals
    for k in range(1, len(totals) + 1):
        if tolerance > 0 and checks_convergence(k) and bool(converged(best[k - 1], best[k - 1 - TOLERANCE_WINDOW], tolerance)):
            return k
    return len(totals)


def _rows(iteration: int, terms: dict[str, Tensor]) -> Tensor:
    """Stack a step's loss terms into ``[n_terms + 1, B]`` without leaving the device."""
    values = list(terms.values())
    it = torch.full_like(values[0], float(iteration))
    return torch.stack([it, *values]).detach()


@dataclass
class Optimised:
    """What :func:`optimise` returns for a batch."""

    images: Tensor  # [B, 3, H, W], on the device: per item, the image of its lowest total loss
    histories: list[list[dict[str, float]]]
    stop_iterations: list[int]  # per item: the evaluation it stopped at
    stop_reasons: list[str]
    wall_time_s: float
    image_iterations: list[int] = field(default_factory=list)  # per item: the iteration whose image is returned
    divergences: list[list[int]] = field(default_factory=list)  # per item: iterations the divergence guard fired at
    execution: str = "nchw"  # how the trunk ran (nst_core.execution.choose_execution)


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
    guidance: StyleGuidance | None = None,
    snapshot: SnapshotHook | None = None,
    divergence_factor: float | None = DIVERGENCE_FACTOR,
) -> Optimised:
    """Optimise a batch ``init`` ``[B, 3, H, W]`` against per-item targets.

    ``content`` maps each content layer to ``[B|1, ...]`` features, ``style``
    each style layer to ``[B|1, N, N]`` per-position Grams (with ``guidance``,
    spatial control: ``[B, S, N, N]``, one per style and mask). ``params``
    (everything but images and seed) is shared by the batch. ``snapshot`` is
    called after every evaluation with the image it evaluated.

    ``iterations`` (default ``params.iterations``) loss evaluations are made;
    the optimiser steps after each but the last. Each item's returned image is
    the one of its lowest total loss among those evaluations
    (``image_iterations`` says which; with a fixed step, L-BFGS's last iterate
    is often not its best). With ``params.tolerance`` > 0 an item stops once
    its best total loss fell by less than that fraction over
    :data:`TOLERANCE_WINDOW` iterations, and leaves the batch: the forward
    and backward passes, losses and optimiser steps that follow hold only the
    items still running (each item's optimiser state is its own, so the others
    go on exactly as before; tested in float64 against each item alone), and a
    stopped item's image stays as it stopped (what ``snapshot`` and
    ``callback`` see for it).

    The divergence guard (L-BFGS; ``divergence_factor``, default
    :data:`DIVERGENCE_FACTOR`, ``None`` turns it off): when an active item's
    total loss exceeds ``divergence_factor`` times its best so far (or is not
    finite), its best image is put back, its L-BFGS history forgotten and its
    step halved (:meth:`BatchedLBFGS.reset`); the iterations it fired at are
    in ``divergences``. The fixed-step L-BFGS does diverge now and then (seen:
    ``color=histogram`` at 224 px, total loss 1.8 -> 340 in one step and never
    back below 1800); without the guard the item would end on the diverged image.

    Every decision (early stop, guard, best image) is per item, and no
    optimiser state is shared between items, so an item's run does not depend
    on its batch, up to floating-point rounding. How far that goes is
    tested: in float64 (``dtype`` and a float64 network) an item's losses,
    guard firings and image in a batch equal those alone (tested to 1e-12
    relative; measured identical). In float32 the batch's convolutions round
    differently in the last bits (~1e-7 relative), and the fixed-step L-BFGS
    amplifies such differences chaotically over the iterations (measured at
    32 px: 3e-7 relative at the first iteration, 1.5e-3 after 15), so a
    batched item is not its lone run to the pixel after many iterations; the
    tests compare each iteration's total loss within 0.2 % over the first few
    (``tests/unit/test_engine_stylize.py``). Raises :class:`TimeLimitExceeded` past
    ``time_limit_s`` seconds.
    """
    start = time.perf_counter()
    n_iterations = params.iterations if iterations is None else iterations
    weights = loss_weights(params)
    loss_fn = GatysLoss(weights, content, style, guidance)
    layers = weights.layers
    x = init.detach().to(network.device, dtype).clone().requires_grad_(True)
    batch = x.shape[0]
    execution = choose_execution(network, x.shape, layers, x.dtype, style_layers=tuple(weights.style_layers))
    optimizer = make_optimizer(params.optimizer, x, params.effective_lr)
    guard = divergence_factor is not None and hasattr(optimizer, "reset")
    names: list[str] = []
    steps: list[Tensor] = []  # per iteration, [n_terms + 1, B]
    best: list[Tensor] = []
    best_image = x.detach().clone()
    best_iteration = torch.full((batch,), first_iteration, dtype=torch.long, device=x.device)
    fired: list[Tensor] = []  # per iteration, [B] bool: the guard reset the item (kept on the device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    # The items still optimised, as indices into the batch: a stopped item leaves the working batch
    # (``x`` and the loss and optimiser state hold only these), so it costs nothing more. ``None``: all.
    working: Tensor | None = None
    images = x.detach()  # every item's current image, [B, ...] (a stopped item's stays as it stopped)
    stop_at = [n_iterations] * batch
    reasons = ["iterations"] * batch
    last = first_iteration + n_iterations - 1
    for k, i in enumerate(range(first_iteration, last + 1), start=1):
        with torch.enable_grad():
            total, terms = loss_fn(features(network, x, layers, execution), x)
            (grad,) = torch.autograd.grad(total.sum(), x)
        names = names or list(terms)
        steps.append(_rows(i, terms) if working is None else steps[-1].index_copy(1, working, _rows(i, terms)))
        if snapshot is not None:
            snapshot(i, images)
        if callback is not None and (i % params.progress_every == 0 or i == last):
            elapsed = time.perf_counter() - start
            callback(IterationInfo(i, last, _item_losses(names, steps[-1]), elapsed, images))
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            raise TimeLimitExceeded(f"timeout: stopped after {i} of {last} iterations ({time_limit_s:g} s limit)")
        loss = steps[-1][1]  # the total of every item (a stopped item's: its last)
        with torch.no_grad():
            # The best so far per item (a NaN loss is never best; a stopped item's best stays as it was).
            improved = active & ((loss < best[-1]) | (best[-1].isnan() & ~loss.isnan())) if best else torch.ones_like(active)
            best.append(torch.where(improved, loss, best[-1]) if best else loss)
            torch.where(improved[:, None, None, None], images, best_image, out=best_image)
            best_iteration = torch.where(improved, torch.full_like(best_iteration, i), best_iteration)
        if params.tolerance > 0 and checks_convergence(k):
            done_now = converged(best[-1], best[-1 - TOLERANCE_WINDOW], params.tolerance)
            newly = (done_now & active).cpu().tolist()
            for b, done in enumerate(newly):
                if done:
                    stop_at[b] = k
                    reasons[b] = f"converged: best total loss improved < {params.tolerance:g} over {TOLERANCE_WINDOW} iterations"
            if any(newly):
                active = active & ~done_now
                still = active.nonzero()[:, 0]
                if still.numel() == 0:
                    break
                # The stopped items leave the working batch: what follows runs on the others only.
                images = images.clone() if working is None else images
                within = torch.searchsorted(torch.arange(batch, device=x.device) if working is None else working, still)
                x = x.detach()[within].clone().requires_grad_(True)
                grad, working = grad[within], still
                loss_fn = GatysLoss(weights, _items(content, within), _items(style, within), _guided_items(guidance, within))
                optimizer.keep(within, x)
        if k < n_iterations:
            optimizer.step(x, grad)
            if guard:
                # Decided on the device (no synchronisation): the image and optimiser state of the
                # items that diverged are replaced; the others' are left as they are.
                mine = loss if working is None else loss[working]
                best_mine = best[-1] if working is None else best[-1][working]
                diverged = (mine > divergence_factor * best_mine) | ~torch.isfinite(mine)
                with torch.no_grad():
                    torch.where(diverged[:, None, None, None], best_image if working is None else best_image[working], x.detach(), out=x.detach())
                optimizer.reset(diverged)  # type: ignore[union-attr]
                fired.append(diverged if working is None else torch.zeros_like(active).index_copy_(0, working, diverged))
            if working is not None:
                images.index_copy_(0, working, x.detach())
    histories = _histories(["iteration", *names], steps, batch)
    histories = [h[: stop_at[b]] for b, h in enumerate(histories)]
    divergences = [[] for _ in range(batch)] if not fired else _fired_at(torch.stack(fired), first_iteration)
    return Optimised(
        best_image, histories, stop_at, reasons, time.perf_counter() - start,
        image_iterations=best_iteration.cpu().tolist(), divergences=divergences, execution=execution.label,
    )  # fmt: skip


def _items(targets: dict[str, Tensor], within: Tensor) -> dict[str, Tensor]:
    """Per-item targets ``[b, ...]`` of the items ``within`` a working batch of ``b`` > 1 (a target of one, ``[1, ...]``, is shared)."""
    return {name: t if t.shape[0] == 1 else t.index_select(0, within) for name, t in targets.items()}


def _guided_items(guidance: StyleGuidance | None, within: Tensor) -> StyleGuidance | None:
    if guidance is None:
        return None
    weights = guidance.weights if guidance.weights.shape[0] == 1 else guidance.weights.index_select(0, within)
    return StyleGuidance(guidance.masks.index_select(0, within), weights)


def _fired_at(fired: Tensor, first_iteration: int) -> list[list[int]]:
    """``[T, B]`` bool -> per item, the iterations at which the guard fired."""
    table = fired.cpu().tolist()
    return [[first_iteration + t for t, row in enumerate(table) if row[b]] for b in range(fired.shape[1])]


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


def image_label(kind: str, names: Mapping[str, str] | None, role: str) -> str:
    """How an error refers to an input: ``'content image tubingen.jpg'``, or the bare ``kind`` without a name."""
    name = (names or {}).get(role)
    return f"{kind} {name}" if name else kind


def _resized_inputs(
    params: StyleParams,
    content: Image.Image,
    styles: Sequence[Image.Image],
    init_image: Image.Image | None,
    long_side: int | None,
    names: Mapping[str, str] | None = None,
) -> tuple[Tensor, list[Tensor], Tensor]:
    side = long_side or params.size
    style_side = max(1, round(side * params.style_scale))
    content_t = images.resized_tensor(content, long_side=side)
    styles_t = [images.resized_tensor(style, long_side=style_side) for style in styles]
    min_side = min_image_side(params.content_layers + params.style_layers)
    images.check_min_side(content_t, min_side, f"{image_label('content image', names, 'content')} (after resizing to {side} px)")
    for k, style_t in enumerate(styles_t):
        kind = "style image" if len(styles_t) == 1 else f"style image {k + 1}"
        label = image_label(kind, names, input_role("style", k))
        images.check_min_side(style_t, min_side, f"{label} (after resizing to {style_side} px = size * style_scale)")
    hw = (content_t.shape[2], content_t.shape[1])
    style_same = images.resized_tensor(styles[0], exact=hw) if params.init == "style" else None
    init_t = images.resized_tensor(init_image, exact=hw) if init_image is not None else None
    if params.init_is_image and init_t is None:
        raise ImageError(f"init={params.init!r} names an image, but it was not loaded")
    return content_t, styles_t, initial_image(params, content_t, style_same, init_t)


def prepare_images(
    params: StyleParams,
    content: Image.Image,
    style: Image.Image,
    init_image: Image.Image | None = None,
    long_side: int | None = None,
    names: Mapping[str, str] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Resize content (long side ``long_side``, default ``size``), style (that times ``style_scale``) and the start.

    Returns content ``[3, H, W]``, style ``[3, h, w]`` and the start image ``[3, H, W]``, as they are
    (no colour mode applied: see :func:`stage_inputs`). ``init='style'`` starts from the (first) style.
    ``names`` (see :attr:`Job.names`) name the images in errors.
    """
    content_t, styles_t, init_t = _resized_inputs(params, content, [style], init_image, long_side, names)
    return content_t, styles_t[0], init_t


@dataclass(frozen=True)
class Job:
    """One item of a batch: its images and its own parameters (batch-compatible with the others).

    ``style`` is one image or several (blended with ``params.style_blend_weights``);
    ``style_masks``, when given, one mask image per style (spatial control).
    ``names``, when given, is how errors refer to the images (a file name or
    URI), by role: ``content``, ``style``, ``style_1``, ..., ``style_mask``,
    ``style_mask_1``, ..., ``init`` (:func:`input_role`; the pipeline's roles).
    A role without a name is referred to by its kind ("content image").
    """

    content: Image.Image
    style: Image.Image | Sequence[Image.Image]
    params: StyleParams
    init_image: Image.Image | None = None
    style_masks: Sequence[Image.Image] | None = None
    names: Mapping[str, str] | None = None

    @property
    def styles(self) -> tuple[Image.Image, ...]:
        return (self.style,) if isinstance(self.style, Image.Image) else tuple(self.style)

    def check(self) -> None:
        """Refuse a job whose images the parameters do not match, naming the parameter."""
        n_styles = len(self.styles)
        self.params.check_styles(n_styles)
        if self.style_masks is not None and len(self.style_masks) != n_styles:
            raise StyleInputsError("style_masks", f"has {len(self.style_masks)} images for {n_styles} styles")
        if self.params.style_masks is not None and self.style_masks is None:
            raise StyleInputsError("style_masks", "names mask images, but none were loaded")


@dataclass(frozen=True)
class StageInputs:
    """One job's images at one stage's size, as the optimisation sees them."""

    content: Tensor  # [3, H, W] (grey under color=luminance)
    styles: list[Tensor]  # [3, h, w] each (transformed under color=luminance|histogram)
    init: Tensor  # [3, H, W]
    masks: Tensor | None  # [S, 1, H, W] in [0, 1], or None
    colour_content: Tensor  # [3, H, W]: the content as it is (the output's chroma under color=luminance)
    blend: tuple[float, ...]  # w_s per style, summing to 1


def stage_inputs(job: Job, long_side: int | None = None) -> StageInputs:
    """Resize a job's images for a stage (long side ``long_side``), load its masks, apply ``params.color``."""
    params = job.params
    content, styles, init = _resized_inputs(params, job.content, job.styles, job.init_image, long_side, job.names)
    size = (content.shape[2], content.shape[1])
    masks = None
    if job.style_masks is not None:
        labels = [image_label(f"style mask {k + 1}", job.names, input_role("style_mask", k)) for k in range(len(job.style_masks))]
        masks = torch.stack([images.mask_tensor(m, size, label) for m, label in zip(job.style_masks, labels)])
    net_content, net_styles, net_init = color.network_inputs(params.color, content, styles, init, init_is_style=params.init == "style")
    return StageInputs(net_content, net_styles, net_init, masks, content, params.blend_weights(len(styles)))


def result_image(params: StyleParams, optimised: Tensor, inputs: StageInputs) -> Tensor:
    """The image an optimised tensor ``[3, H, W]`` stands for (colour put back under ``color=luminance``), in [0, 1]."""
    return color.output_image(params.color, optimised, inputs.colour_content.to(optimised.device))


def batch_style_targets(
    network: Network, params: StyleParams, stage: Sequence[StageInputs], cache: StyleTargetCache | None = None
) -> tuple[dict[str, Tensor], StyleGuidance | None]:
    """The style targets of a batch at one stage, per style layer.

    Without masks: each item's styles blended, ``A = sum_s w_s A_s`` -> ``[B, N, N]``.
    With masks: one target per style, ``[B, S, N, N]``, and the masks and weights that guide them.
    Each style's Grams come through ``cache`` when given.
    """
    layers = params.style_layers
    get = cache.get if cache is not None else style_targets
    per_item = [[get(network, style, layers) for style in inputs.styles] for inputs in stage]
    weights = [inputs.blend for inputs in stage]
    if stage[0].masks is None:
        blended = [{n: blend_grams([t[n] for t in targets], w) for n in layers} for targets, w in zip(per_item, weights)]
        return _stack_targets(blended), None
    guided = [{n: torch.stack([t[n][0] for t in targets]).unsqueeze(0) for n in layers} for targets in per_item]
    masks = torch.stack([inputs.masks for inputs in stage if inputs.masks is not None]).to(network.device)
    if masks.shape[0] != len(stage):
        raise ValueError("items of a batch must all have style masks or none")
    guidance = StyleGuidance(masks=masks, weights=torch.tensor(weights, device=network.device))
    return _stack_targets(guided), guidance


def _stack_targets(per_item: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {name: torch.cat([t[name] for t in per_item]) for name in per_item[0]} if per_item else {}


# Bytes per pixel of each feature map the network keeps for its backward pass (one per convolution),
# and copies of each style layer's Gram per item, measured on the CPU with the profiler's memory
# timeline (``execution.peak_bytes``) at 64-256 px: per item, fp32 4,357 bytes per pixel + 6.3 MB,
# bf16 3,602 + 10.6 MB, of which the L-BFGS history is 2,412 bytes per pixel in both. bf16 keeps one
# Gram copy less since its style term's backward scales ``D`` instead of adding ``D^T`` (measured at
# 48 px: 16.7 -> 14.6 MB per item; one float32 copy of the five style layers' Grams is 2.4 MB).
_KEPT_BYTES = {"fp32": 6.7, "bf16": 4.1}
_GRAM_COPIES = {"fp32": 2.6, "bf16": 3.3}
_MEMORY_MARGIN = 1.1  # what the CPU's count does not see on a GPU: allocator rounding, cuDNN workspaces


def estimate_item_bytes(height: int, width: int, params: StyleParams, precision: str = "fp32") -> int:
    """Device memory one item of a batch needs at ``height`` x ``width``, for choosing batch sizes.

    Args:
        height, width: the optimised image's size.
        params: the item's parameters (``optimizer``, ``style_layers``).
        precision: how the network computes, resolved on the device (``fp32`` or ``bf16``,
            :func:`nst_core.network.resolve_precision`): bf16 runs keep 0.6 of fp32's bytes per feature map
            element (some of what surrounds them stays float32).

    The sum of what a run keeps per item, with :data:`_MEMORY_MARGIN`:

    * the feature maps kept for the backward pass, one per convolution up to relu5_1
      (``sum_blocks channels x convs x pixels / 4^block``, 290 per pixel), with the gradients and
      temporaries around them: :data:`_KEPT_BYTES` per element, measured;
    * the optimiser's state in float32: L-BFGS ``2 m`` vectors of ``3 x pixels`` (m =
      :data:`LBFGS_HISTORY`), Adam two; and the best image so far;
    * per style layer, :data:`_GRAM_COPIES` ``N_l x N_l`` float32 matrices (the target prepared once,
      the difference and its gradient).

    The model was fitted to the CPU's count (``tests/unit/test_memory_estimate.py`` holds it within
    20 % above it); the formula before it counted two feature maps per convolution and their
    gradients, twice what runs keep (433 against 220 MB at 256 px in fp32), which halved the
    automatic batch size on a GPU.
    """
    pixels = height * width
    per_block = [(64, 2, 1), (128, 2, 4), (256, 4, 16), (512, 4, 64), (512, 1, 256)]  # channels, convs, downsampling^2
    kept = sum(ch * convs * pixels // down for ch, convs, down in per_block)
    state = 2 * LBFGS_HISTORY * 3 * pixels if params.optimizer == "lbfgs" else 2 * 3 * pixels
    state += 3 * pixels  # the best image so far
    grams = sum(layer_channels(name) ** 2 for name in params.style_layers)
    precision = precision if precision in _KEPT_BYTES else "fp32"
    return int(_MEMORY_MARGIN * (_KEPT_BYTES[precision] * kept + 4 * state + 4 * _GRAM_COPIES[precision] * grams))


def network_for(params: StyleParams, device: torch.device, weights_path: str | None = None, weights_sha256: str | None = None) -> Network:
    """The (cached) network ``params`` ask for on ``device``: weights, pooling, normalisation.

    Args:
        params: the item's parameters (``weights``, ``weights_sha256``, ``pooling``, ``normalize_network``).
        device: where the network lives.
        weights_path: a local copy of a remote weights file (fetched by the caller), else None.
        weights_sha256: the sha256 the weights file must have, when the caller knows it (the hash an
            item was named by); else ``params.weights_sha256``.

    Raises:
        WeightsError: the weights cannot be loaded (see :func:`nst_core.network.load_network`).
    """
    return load_network(
        params.weights,
        pooling=params.pooling,
        device=device,
        weights_path=weights_path,
        weights_sha256=weights_sha256 or params.weights_sha256,
        normalize=params.normalize_network,
    )


def cpu_batch_size(params: StyleParams, height: int, width: int, limit: int, weights_path: str | None = None) -> int:
    """Items of ``height`` x ``width`` one optimisation should hold on the CPU: the batch size whose trunk
    pass costs least per item, measured on this machine (:func:`nst_core.execution.choose_batch_size`),
    at most ``limit`` (what memory holds, the caller's call). 1 on another device.

    Run it on the thread that optimises (the measurement times the CPU; PyTorch keeps an OpenMP team
    per thread). Raises what :func:`network_for` raises when the weights cannot be loaded.
    """
    device = resolve_device(params.device)
    if device.type != "cpu" or limit <= 1:
        return 1
    network = network_for(params, device, weights_path)
    network = network.at_precision(resolve_precision(params.precision, device))
    weights = loss_weights(params)
    shape = (1, 3, height, width)
    execution = choose_execution(network, shape, weights.layers, style_layers=tuple(weights.style_layers))
    return choose_batch_size(network, shape, weights.layers, execution, limit)


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
    content images must resize to the same height and width. Items do not
    share any optimiser state or decision, so an item's result is what it
    gets alone up to floating-point rounding, which L-BFGS amplifies over many
    iterations in float32: see :func:`optimise` for the tolerances tested.
    Coarse-to-fine (``params.scales``): each stage optimises at its size,
    starting from the previous stage's result upsampled. An item with
    ``save_every`` > 0 gets a snapshot of its image every that many iterations
    (as it would be output: colour put back under ``color=luminance``).
    """
    if not jobs:
        return []
    params = jobs[0].params
    if any(job.params.batch_key() != params.batch_key() for job in jobs):
        raise ValueError("items of a batch must share every parameter but seed, init and output_format")
    for job in jobs:
        job.check()
    if network is None:
        network = network_for(params, resolve_device(params.device), weights_path)
    elif network.normalized != params.normalize_network:
        raise ValueError(f"normalize_network={params.normalize_network} but the network given is {'' if network.normalized else 'not '}normalised")
    network = network.at_precision(resolve_precision(params.precision, network.device))
    started = time.perf_counter()
    x: Tensor | None = None
    histories: list[list[dict[str, float]]] = [[] for _ in jobs]
    snapshots: list[list[tuple[int, Image.Image]]] = [[] for _ in jobs]
    divergences: list[list[int]] = [[] for _ in jobs]
    reasons = ["iterations"] * len(jobs)
    image_iterations: list[int] = [0] * len(jobs)
    executions: list[str] = []  # per stage
    weights = loss_weights(params)
    done_iterations = 0
    stage: list[StageInputs] = []
    for long_side, stage_iterations in params.stages:
        stage = [stage_inputs(job, long_side) for job in jobs]
        shapes = {tuple(inputs.content.shape) for inputs in stage}
        if len(shapes) != 1:
            raise ValueError(f"items of a batch must have the same size at {long_side} px, got {sorted(shapes)}")
        # The layout optimise will choose for this size (the same cached choice: one per long side and layers read).
        execution = choose_execution(network, (1, *stage[0].content.shape), weights.layers, stage[0].content.dtype, style_layers=tuple(weights.style_layers))
        p_content = _stack_targets([content_targets(network, inputs.content, params.content_layers, execution) for inputs in stage])
        a_style, guidance = batch_style_targets(network, params, stage, cache)
        if x is None:
            start_images = torch.stack([inputs.init for inputs in stage])
        else:  # coarse-to-fine: continue from the previous stage's result
            size = stage[0].content.shape[-2:]
            start_images = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False).clamp(0, 1)
        remaining = None if time_limit_s is None else time_limit_s - (time.perf_counter() - started)
        run = optimise(
            network, params, start_images, p_content, a_style,
            iterations=stage_iterations, callback=callback, time_limit_s=remaining, first_iteration=done_iterations + 1,
            guidance=guidance, snapshot=_snapshot_taker(jobs, stage, snapshots),
        )  # fmt: skip
        for b, rows in enumerate(run.histories):
            histories[b] += [{**row, "size": long_side} for row in rows] if len(params.stages) > 1 else rows
        reasons = run.stop_reasons
        executions.append(run.execution)
        image_iterations = run.image_iterations
        for b, fired in enumerate(run.divergences):
            divergences[b] += fired
        done_iterations += stage_iterations
        x = run.images
    assert x is not None
    wall = time.perf_counter() - started
    return [
        StyleResult(
            image=result_image(job.params, x[b], stage[b]).cpu(),
            history=histories[b],
            iterations=len(histories[b]),
            wall_time_s=wall,
            device=str(network.device),
            precision=network.precision,
            execution="|".join(executions),
            weights_id=network.weights_id,
            params=job.params,
            stop_reason=reasons[b],
            extra={"batch_size": len(jobs), "image_iteration": image_iterations[b], "divergences": divergences[b]},
            snapshots=_ran(snapshots[b], histories[b]),
            image_iteration=image_iterations[b],
        )
        for b, job in enumerate(jobs)
    ]


def _ran(snapshots: list[tuple[int, Image.Image]], history: list[dict[str, float]]) -> list[tuple[int, Image.Image]]:
    """The snapshots of iterations an item ran (one that stopped early runs on in its batch, frozen)."""
    ran = {int(row["iteration"]) for row in history}
    return [(i, image) for i, image in snapshots if i in ran]


def _snapshot_taker(
    jobs: Sequence[Job], stage: list[StageInputs], out: list[list[tuple[int, Image.Image]]]
) -> SnapshotHook | None:
    """A hook that appends ``(iteration, image)`` to ``out[b]`` every ``save_every`` iterations of item ``b``."""
    if not any(job.params.save_every for job in jobs):
        return None

    def take(iteration: int, x: Tensor) -> None:
        for b, job in enumerate(jobs):
            every = job.params.save_every
            if every and iteration % every == 0:
                out[b].append((iteration, images.to_pil(result_image(job.params, x[b], stage[b]))))

    return take


def stylize(
    content: Image.Image,
    style: Image.Image | Sequence[Image.Image],
    params: StyleParams | None = None,
    *,
    init_image: Image.Image | None = None,
    style_masks: Sequence[Image.Image] | None = None,
    network: Network | None = None,
    weights_path: str | None = None,
    callback: Callback | None = None,
    cache: StyleTargetCache | None = None,
    time_limit_s: float | None = None,
    names: Mapping[str, str] | None = None,
) -> StyleResult:
    """Stylise one content image with one style image, or several (a batch of one).

    Images are RGB PIL images (see :func:`nst_core.images.load_image`);
    ``style`` may be a sequence of images (blended by ``params.style_blend_weights``),
    ``style_masks`` one mask per style (spatial control).
    ``network`` defaults to the cached VGG-19 for ``params.weights``;
    ``weights_path`` is the local copy of a remote weights file; ``cache``
    reuses style targets across calls; ``names`` name the images in errors (:attr:`Job.names`).
    """
    job = Job(content, style, params or StyleParams(), init_image, style_masks, names)
    return stylize_batch(
        [job], network=network, weights_path=weights_path, callback=callback, cache=cache, time_limit_s=time_limit_s
    )[0]
