"""A quality measure the optimisation does not see.

An output is judged with a VGG-19 whose weights differ from the ones it was
optimised against (by default seeded random weights ``random:1000``, or
``random:1001`` when the optimisation itself used ``random:1000``), so a
result cannot score well by exploiting the very network it was fitted to:

* style distance: mean over the default style layers of the relative
  per-position Gram error, ``sum (G/M - A/M_s)^2 / sum (A/M_s)^2``, leaving
  out a layer whose feature map has fewer than ``MIN_GRAM_POSITIONS``
  positions in the output or the style image (at 64 px, ``relu5_1`` is 4x3:
  a Gram matrix over a dozen positions is noise, not a texture statistic);
* content distance: the relative feature error at ``relu4_2``,
  ``sum (F - P)^2 / sum P^2``.

Both are the ``target``-normalised loss terms, measured by another network.
With several styles, the style distance is to the blend of their Grams
(``sum_s w_s A_s``, the blend weights of the parameters); masks and colour
modes are not taken into account (the distance is to the paintings as given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nst_core.losses import blend_grams, content_loss, mean_gram, style_layer_loss
from nst_core.network import Network, load_network
from nst_core.params import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS, StyleParams

if TYPE_CHECKING:
    from PIL import Image

JUDGE_SEED = 1000
MIN_GRAM_POSITIONS = 16


def judge_weights(optimised_weights_id: str) -> str:
    """Weights for judging, guaranteed to differ from ``optimised_weights_id``."""
    seed = JUDGE_SEED if optimised_weights_id != f"random:{JUDGE_SEED}" else JUDGE_SEED + 1
    return f"random:{seed}"


def judge_network(optimised_weights_id: str, device: str | torch.device = "cpu") -> Network:
    return load_network(judge_weights(optimised_weights_id), pooling="avg", device=device)


@dataclass(frozen=True)
class Quality:
    style_distance: float
    content_distance: float
    judge_weights: str

    def as_dict(self) -> dict[str, float | str]:
        return {
            "style_distance": self.style_distance,
            "content_distance": self.content_distance,
            "judge_weights": self.judge_weights,
        }


@torch.no_grad()
def style_distance(network: Network, image: Tensor, style: Tensor | Sequence[Tensor], blend: Sequence[float] | None = None) -> float:
    """Mean relative Gram error of ``image`` ``[3, H, W]`` to ``style`` ``[3, h, w]`` (or to a blend of styles)."""
    layers = list(DEFAULT_STYLE_LAYERS)
    styles = [style] if isinstance(style, Tensor) else list(style)
    weights = list(blend) if blend is not None else [1.0 / len(styles)] * len(styles)
    f_img = network.features(image.unsqueeze(0).to(network.device), layers)
    f_sty = [network.features(s.unsqueeze(0).to(network.device), layers) for s in styles]
    terms = [
        style_layer_loss(f_img[n], blend_grams([mean_gram(f[n]) for f in f_sty], weights))
        for n in layers
        if min(_positions(f_img[n]), *(_positions(f[n]) for f in f_sty)) >= MIN_GRAM_POSITIONS
    ]
    if not terms:
        raise ValueError("images too small to measure a style distance")
    return float(torch.stack(terms).mean())


def _positions(features: Tensor) -> int:
    return features.shape[-2] * features.shape[-1]


@torch.no_grad()
def content_distance(network: Network, image: Tensor, content: Tensor) -> float:
    """Relative ``relu4_2`` feature error of ``image`` to ``content`` (same height and width)."""
    layers = list(DEFAULT_CONTENT_LAYERS)
    f_img = network.features(image.unsqueeze(0).to(network.device), layers)
    f_con = network.features(content.unsqueeze(0).to(network.device), layers)
    return float(sum(content_loss(f_img[n], f_con[n]) for n in layers) / len(layers))


def measure(
    image: Tensor, content: Tensor, style: Tensor | Sequence[Tensor], optimised_weights_id: str,
    device: str | torch.device = "cpu", blend: Sequence[float] | None = None,
) -> Quality:  # fmt: skip
    """Style and content distances of an output, judged by another network."""
    net = judge_network(optimised_weights_id, device)
    return Quality(
        style_distance=style_distance(net, image.clamp(0, 1), style, blend),
        content_distance=content_distance(net, image.clamp(0, 1), content),
        judge_weights=net.weights_id,
    )


def measure_result(
    image: Tensor, content: Image.Image, style: Image.Image | Sequence[Image.Image], params: StyleParams,
    optimised_weights_id: str, device: str | torch.device = "cpu",
) -> Quality:  # fmt: skip
    """:func:`measure` for an engine output, with content and style(s) resized as the engine resized them."""
    from PIL import Image

    from nst_core.engine import prepare_images

    styles = [style] if isinstance(style, Image.Image) else list(style)
    plain = params.with_overrides(init="content")
    prepared = [prepare_images(plain, content, s) for s in styles]
    content_t = prepared[0][0]
    return measure(image, content_t, [p[1] for p in prepared], optimised_weights_id, device, params.blend_weights(len(styles)))
