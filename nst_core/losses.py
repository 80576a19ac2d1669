"""The losses of Gatys et al. (2015), as pure functions and one composite module.

Notation (the paper's): a layer ``l`` has ``N_l`` feature maps of ``M_l``
positions each; ``F`` are the generated image's features, ``P`` the content
image's, ``G = F F^T`` and ``A`` the Gram matrices of the generated and style
images. Every function works on a batch and returns one value per item
(shape ``[B]``), so a batch of images is optimised as independent problems.

Two normalisations (``StyleParams.loss_normalization``):

``paper``::

    content_l = 1/2 * sum (F - P)^2
    style_l   = sum (G - A)^2 / (4 N_l^2 M_l^2)

``target`` (default; scale-free, each term divided by its target's energy)::

    content_l = sum (F - P)^2 / sum P^2
    style_l   = sum (G/M - A/M_s)^2 / sum (A/M_s)^2

With several content layers (``content_layers``), the content term is their
mean, ``content = 1/|L_c| sum_l content_l`` (each layer weighs the same, and
alpha keeps its meaning whatever the number of layers); the style term is the
weighted sum ``sum_l w_l style_l`` with the ``style_layer_weights`` ``w_l``.

Gram matrices are compared per position (``G / M``), which equals the
paper's form when the two images have the same size and stays meaningful
when the style image has another size (``style_scale``, other aspect ratio).

Several styles (Gatys et al. 2017, and the classic implementations):

* blending: the target is the weighted mix ``A = sum_s w_s A_s`` of the
  styles' per-position Grams, ``sum_s w_s = 1`` (:func:`blend_grams`);
* spatial control: style ``s`` holds only in the region of its mask
  ``m_s`` (``[1, H, W]`` in [0, 1], at the image's size, averaged down to
  each layer's size). Its guided Gram is the Gram of the masked features per
  unit of mask, ``G_s = (F o m_s)(F o m_s)^T / sum_k m_sk^2`` (the mean
  Gram inside the region), and the style term is
  ``E_l = sum_s w_s E_l(G_s, A_s)`` (:func:`guided_style_layer_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EPS = 1e-12


def _flat_features(features: Tensor) -> Tensor:
    """Features ``[B, N, H, W]`` as ``[B, N, H*W]``, a view in either memory layout (no copy).

    A channels-last tensor is ``[B, H*W, N]`` in memory, so it is reshaped there and transposed
    (matrix products read transposed operands as they are).
    """
    b, n, h, w = features.shape
    if n > 1 and not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last):
        return features.permute(0, 2, 3, 1).reshape(b, h * w, n).transpose(1, 2)
    return features.reshape(b, n, h * w)


def _gram_input_gradient(flat: Tensor, symmetric: Tensor) -> Tensor:
    """``dF = S F`` for flattened features ``F`` ``[B, N, M]`` and a symmetric ``S`` ``[B, N, N]``, in ``F``'s layout."""
    if flat.stride(1) == 1 and flat.stride(2) != 1:
        # Channels-last features (a transposed view, :func:`_flat_features`): dF^T = F^T S gives dF in
        # the features' own layout. ``S @ flat`` would be channels-first, and the network's backward
        # then adds and masks (ReLU) tensors of two layouts, a strided pass each: 40 % of an
        # iteration's time outside the trunk at 256 px.
        return (flat.transpose(1, 2) @ symmetric).transpose(1, 2)
    return symmetric @ flat


class _Gram(torch.autograd.Function):
    """``G = F F^T`` with the backward of a symmetric product: ``dF = (dG + dG^T) F``, one product.

    Autograd's own backward of ``F @ F.T`` makes two products (one per operand) and adds them:
    the Grams are the largest work outside the network (11 % of an iteration at 128 px), a third
    of it in that second product. bfloat16 features are widened first: ``G`` is float32 (see
    :class:`_GramDifference` for why a bfloat16 product will not do).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, flat: Tensor) -> Tensor:
        ctx.save_for_backward(flat)
        wide = flat.float() if flat.dtype == torch.bfloat16 else flat
        return wide @ wide.transpose(1, 2)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return _gram_input_gradient(flat, (grad + grad.transpose(1, 2)).to(flat.dtype))


class _GramDifference(torch.autograd.Function):
    """``D = F F^T / M - A`` for bfloat16 features ``F`` ``[B, N, M]`` and a float32 target ``A``.

    A bfloat16 matrix product rounds its result to bfloat16: the Gram itself, rounded, is 0.4 % off
    in every entry, while late in a run ``G/M - A`` is a few percent of ``G`` (measured: the
    difference 16-24 % off). But the product's accumulator is float32, and ``baddbmm`` subtracts in
    it before rounding: with ``A = A_hi + A_lo`` (``A_hi`` the nearest bfloat16, ``A_lo`` the float32
    rest), ``D = round(F F^T / M - A_hi) - A_lo`` is rounded relative to the *difference* (measured:
    1.7e-3 off, the bfloat16 rounding every gradient gets on its way into the network anyway, against
    1e-5 in float32) and costs a quarter of the float32 product with its widening copy (relu1_1 at
    256 px: 0.7 against 3.3 ms on one AVX512-BF16 CPU). The backward, ``dF = (dD + dD^T) F / M``, is a
    bfloat16 product too: the network's backward takes ``dF`` in bfloat16.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, flat: Tensor, minus_high: Tensor, low: Tensor) -> Tensor:
        ctx.save_for_backward(flat)
        return _difference_in_accumulator(flat, minus_high, low)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        (flat,) = ctx.saved_tensors  # type: ignore[attr-defined]
        symmetric = (grad + grad.transpose(1, 2)) / flat.shape[-1]
        return _gram_input_gradient(flat, symmetric.to(flat.dtype)), None, None


def _difference_in_accumulator(flat: Tensor, minus_high: Tensor, low: Tensor) -> Tensor:
    """``F F^T / M - A`` (float32) for bfloat16 ``F`` and ``A = -minus_high + low``: see :class:`_GramDifference`."""
    rounded = torch.baddbmm(minus_high.expand(flat.shape[0], -1, -1), flat, flat.transpose(1, 2), alpha=1.0 / flat.shape[-1])
    return rounded - low  # float32 (type promotion): the widening and the subtraction in one pass


class _GramDifferenceEnergy(torch.autograd.Function):
    """The style term of bfloat16 features in one step: ``E = c sum (F F^T / M - A)^2`` per item, with
    ``c`` the normalisation's factor, and its gradient ``dE/dF = 2 c (D + D^T) F / M = 4 c D F / M``
    from the kept difference ``D`` (float32, as :class:`_GramDifference` computes it).

    ``D`` is symmetric: ``F F^T`` is, and so is the target's split (:meth:`GramTarget.of` makes it
    exactly so). The computed ``D`` can differ from its transpose only where the two float32 sums of
    an entry and its mirror round to neighbouring bfloat16 values: by one bfloat16 step of that entry,
    the rounding every gradient gets on its way into the network anyway. So the backward scales ``D``
    instead of adding its transpose: a transposed pass over a ``512 x 512`` float32 matrix (rows 2 KB
    apart) took 0.2-0.3 ms, eight times the plain pass, twice per iteration (relu4_1, relu5_1).

    The same maths as :class:`_GramDifference` followed by :func:`gram_difference_loss`, but autograd
    made that six graph nodes and about twelve elementwise passes over the ``N x N`` matrices per layer
    (square, sum, divide, and their backwards; the symmetrising add, the divide by ``M``, the casts):
    3-4 ms of a 128 px iteration's ~60 on one AVX512-BF16 CPU, as much as the Gram products themselves.
    Here the forward passes over ``D`` twice and the backward once.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, flat: Tensor, minus_high: Tensor, low: Tensor, factor: Tensor) -> Tensor:
        difference = _difference_in_accumulator(flat, minus_high, low)
        ctx.save_for_backward(flat, difference, factor)
        return (difference * difference).sum((1, 2)) * factor

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        flat, difference, factor = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = (grad * factor * (4.0 / flat.shape[-1]))[:, None, None]
        symmetric = torch.empty_like(difference, dtype=flat.dtype)  # scaled and cast in one pass
        torch.mul(difference, scale, out=symmetric)
        return _gram_input_gradient(flat, symmetric), None, None, None


@dataclass(frozen=True)
class GramTarget:
    """A per-position style target ``A`` ``[B|1, N, N]`` and what every iteration reads of it, computed
    once (:meth:`of`): its energy ``sum A^2`` per item (``target`` normalisation) and its split
    ``A = A_hi + A_lo`` for bfloat16 features (:class:`_GramDifference`; stored as ``-A_hi``).

    The split is of ``(A + A^T) / 2``: a Gram matrix is symmetric, and a computed one (or a blend of
    them) equals that to float32's last bit; exact symmetry is what lets :class:`_GramDifferenceEnergy`
    take ``D + D^T`` as ``2 D``."""

    gram: Tensor
    energy: Tensor  # [B|1]
    minus_high: Tensor  # -A_hi, bfloat16
    low: Tensor  # A - A_hi, float32

    @staticmethod
    def of(gram: Tensor) -> GramTarget:
        wide = gram.float()
        wide = (wide + wide.transpose(-1, -2)) * 0.5
        high = wide.to(torch.bfloat16)
        return GramTarget(gram, _per_item_sum(gram.square()).clamp_min(_EPS), -high, wide - high.float())


def gram_matrix(features: Tensor) -> Tensor:
    """G_ij = sum_k F_ik F_jk for features ``[B, N, H, W]`` -> ``[B, N, N]`` (not normalised)."""
    return _Gram.apply(_flat_features(features))


def mean_gram(features: Tensor) -> Tensor:
    """The Gram matrix per position, ``G / M``: what style targets store."""
    return gram_matrix(features) / (features.shape[-2] * features.shape[-1])


def mean_gram_difference(features: Tensor, target: GramTarget) -> Tensor:
    """``G/M - A`` for features ``[B, N, H, W]`` and a per-position target ``A`` ``[B|1, N, N]``: ``[B, N, N]``.

    bfloat16 features: computed in their product's float32 accumulator (:class:`_GramDifference`).
    """
    if features.dtype == torch.bfloat16:
        return _GramDifference.apply(_flat_features(features), target.minus_high, target.low)
    return mean_gram(features) - target.gram


def _per_item_sum(x: Tensor) -> Tensor:
    """The sum over every dimension but the batch's, in float32 at least, reading ``x`` in its own layout.

    A bfloat16 sum is accumulated in float32 but returned rounded to bfloat16: the content term of
    bfloat16 features came out to three significant digits (0.2 %), the size of what the early-stopping
    rule compares over ten iterations (``tolerance`` 0.003). And ``flatten`` of channels-last features
    copied them first: the content term at 512 px took 4.7 ms a pass, 1.1 ms now (relu4_2, bf16).
    """
    return x.sum(tuple(range(1, x.dim())), dtype=torch.promote_types(x.dtype, torch.float32))


def content_loss(features: Tensor, target: Tensor, normalization: str = "target", target_energy: Tensor | None = None) -> Tensor:
    """Content term at one layer; ``target`` (P) broadcasts over the batch. ``target_energy``: its
    :func:`content_energy`, when prepared once for many evaluations (:class:`GatysLoss`)."""
    squared_error = _per_item_sum((features - target).square())
    if normalization == "paper":
        return 0.5 * squared_error
    return squared_error / (content_energy(target) if target_energy is None else target_energy)


def content_energy(target: Tensor) -> Tensor:
    """``sum P^2`` per item of a content target ``[B|1, ...]``: ``[B|1]`` (a shared target's once)."""
    return _per_item_sum(target.square()).clamp_min(_EPS)


def gram_loss(gram: Tensor, target_gram: Tensor, normalization: str = "target") -> Tensor:
    """E_l of two per-position Grams ``[B, N, N]`` and ``[B|1, N, N]``, per item ``[B]``."""
    return gram_difference_loss(gram - target_gram, _per_item_sum(target_gram.square()).clamp_min(_EPS), normalization)


def gram_difference_loss(difference: Tensor, target_energy: Tensor, normalization: str = "target") -> Tensor:
    """E_l from the difference ``G/M - A`` ``[B, N, N]`` of per-position Grams and the target's energy
    ``sum A^2`` (``[B|1]``, used by the ``target`` normalisation), per item ``[B]``."""
    n = difference.shape[-1]
    squared_error = _per_item_sum(difference.square())
    if normalization == "paper":
        # sum (G - A)^2 / (4 N^2 M^2) == sum (G/M - A/M)^2 / (4 N^2)
        return squared_error / (4.0 * n * n)
    return squared_error / target_energy


def style_layer_loss(features: Tensor, target_gram: Tensor | GramTarget, normalization: str = "target") -> Tensor:
    """Style term E_l at one layer; ``target_gram`` is a per-position Gram (A / M_s), ``[B|1, N, N]``
    (or that Gram prepared once, :class:`GramTarget`, as :class:`GatysLoss` does for its iterations)."""
    target = target_gram if isinstance(target_gram, GramTarget) else GramTarget.of(target_gram)
    if features.dtype == torch.bfloat16:  # the same maths in one step (:class:`_GramDifferenceEnergy`)
        n = features.shape[1]
        factor = target.energy.reciprocal() if normalization == "target" else target.energy.new_full((1,), 1.0 / (4.0 * n * n))
        return _GramDifferenceEnergy.apply(_flat_features(features), target.minus_high, target.low, factor)
    return gram_difference_loss(mean_gram_difference(features, target), target.energy, normalization)


def blend_grams(grams: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_s w_s A_s``: the target of a blend of styles (weights already normalised to sum 1)."""
    if len(grams) != len(weights) or not grams:
        raise ValueError(f"{len(grams)} Gram matrices for {len(weights)} blend weights")
    mixed = weights[0] * grams[0]
    for weight, gram in zip(weights[1:], grams[1:]):
        mixed = mixed + weight * gram
    return mixed


def layer_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """A mask ``[B, 1, H, W]`` at the image's size averaged down to a layer's ``(h, w)`` (area interpolation)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


def guided_gram(features: Tensor, mask: Tensor) -> Tensor:
    """``(F o m)(F o m)^T / sum_k m_k^2`` for features ``[B, N, h, w]`` and a mask ``[B, 1, h, w]``: ``[B, N, N]``.

    With a mask of ones this is :func:`mean_gram`.
    """
    weight = mask.square().flatten(1).sum(1).clamp_min(_EPS)
    return gram_matrix(features * mask) / weight[:, None, None]


def guided_style_layer_loss(
    features: Tensor, target_grams: Tensor, masks: Tensor, weights: Tensor, normalization: str = "target"
) -> Tensor:
    """``E_l = sum_s w_s E_l(G_s, A_s)`` with guided Grams ``G_s`` (see the module docstring).

    ``target_grams`` ``[B|1, S, N, N]``, ``masks`` ``[B|1, S, 1, H, W]`` at the image's size,
    ``weights`` ``[B|1, S]`` summing to 1 per item.
    """
    total = features.new_zeros(features.shape[0])
    for s in range(target_grams.shape[1]):
        m = layer_mask(masks[:, s], features.shape[-2:])
        total = total + weights[:, s] * gram_loss(guided_gram(features, m), target_grams[:, s], normalization)
    return total


def tv_loss(image: Tensor, normalization: str = "target") -> Tensor:
    """Total variation: squared differences of neighbouring pixels (summed; or per pixel value)."""
    dh = _per_item_sum((image[..., 1:, :] - image[..., :-1, :]).square())
    dw = _per_item_sum((image[..., :, 1:] - image[..., :, :-1]).square())
    if normalization == "paper":
        return dh + dw
    return (dh + dw) / image[0].numel()


@dataclass(frozen=True)
class LossWeights:
    """alpha, beta, gamma and the per-layer w_l."""

    content: float
    style: float
    tv: float
    style_layers: dict[str, float]
    content_layers: tuple[str, ...]
    normalization: str = "target"

    @property
    def layers(self) -> frozenset[str]:
        """Every layer whose features the loss reads."""
        return frozenset(self.content_layers) | frozenset(self.style_layers)


@dataclass(frozen=True)
class StyleGuidance:
    """Spatial control of several styles: one mask and one blend weight per style and item."""

    masks: Tensor  # [B, S, 1, H, W] in [0, 1], at the optimised image's size
    weights: Tensor  # [B|1, S], each row summing to 1


class GatysLoss(nn.Module):
    """alpha * content + beta * sum_l w_l E_l + gamma * tv, reported term by term.

    Holds the targets of a batch: content features ``[B, ...]`` per content
    layer and per-position style Grams ``[B, N, N]`` per style layer (with
    ``guidance``: ``[B, S, N, N]``, one per style, compared with guided Grams).
    ``forward`` returns the total per item ``[B]`` and a dict of named terms,
    each ``[B]`` and unweighted: ``content`` (the mean of the content layers'
    terms: several content layers are averaged, not summed), ``style``
    (= sum_l w_l E_l), ``tv`` and ``style:<layer>`` (= E_l). Each item's
    terms depend on its own image and targets only.
    """

    def __init__(
        self,
        weights: LossWeights,
        content_targets: dict[str, Tensor],
        style_targets: dict[str, Tensor],
        guidance: StyleGuidance | None = None,
    ):
        super().__init__()
        self.weights = weights
        self.content_targets = content_targets
        self.style_targets = style_targets
        self.guidance = guidance
        # Plain targets prepared once, not every iteration (guided ones are compared per style).
        self._prepared = {name: GramTarget.of(t) for name, t in style_targets.items()} if guidance is None else {}
        self._content_energy = {name: content_energy(t) for name, t in content_targets.items()}

    def style_term(self, features: Tensor, name: str) -> Tensor:
        """E_l at layer ``name``: plain or guided Gram matching."""
        g, norm = self.guidance, self.weights.normalization
        if g is None:
            return style_layer_loss(features, self._prepared[name], norm)
        return guided_style_layer_loss(features, self.style_targets[name], g.masks, g.weights, norm)

    def forward(self, features: dict[str, Tensor], image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.weights
        zero = image.new_zeros(image.shape[0])
        terms: dict[str, Tensor] = {}
        content = zero
        for name in w.content_layers:
            content = content + content_loss(features[name], self.content_targets[name], w.normalization, self._content_energy[name])
        content = content / max(len(w.content_layers), 1)
        style = zero
        for name, layer_weight in w.style_layers.items():
            e_l = self.style_term(features[name], name)
            terms[f"style:{name}"] = e_l
            style = style + layer_weight * e_l
        tv = tv_loss(image, w.normalization) if w.tv > 0 else zero
        total = w.content * content + w.style * style + w.tv * tv
        return total, {"total": total, "content": content, "style": style, "tv": tv, **terms}
