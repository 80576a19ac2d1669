"""Colour preservation: Gatys, Ecker, Bethge, Hertzmann & Shechtman (2017),
"Controlling Perceptual Factors in Neural Style Transfer", section 5.

The ``color`` style parameter picks one of three modes; each is a transform of
the images *before* the optimisation (:func:`network_inputs`) and, for
``luminance``, one after it (:func:`output_image`). Pure functions on tensors
``[3, H, W]`` (or ``[B, 3, H, W]``) in [0, 1].

``none``
    The images as they are.

``luminance`` (luminance-only transfer)
    The optimisation sees luminance only: the content image's ``Y``, and the
    style image's ``Y`` after matching its mean and standard deviation to the
    content's::

        Y_s' = (sigma_c / sigma_s) (Y_s - mu_s) + mu_c

    (each a grey image: ``Y`` in all three channels). The output keeps the
    optimised image's ``Y`` and takes both chroma channels from the content.
    The colour space is YCbCr (ITU-R BT.601, full range: JPEG's and Pillow's)
    rather than the paper's YIQ: both separate luminance (the same ``Y``) from
    two chroma channels, and YCbCr is what users and Pillow measure chroma in.
    ``Y`` is kept within the range where ``(Y, Cb_content, Cr_content)`` is a
    valid RGB colour, so the output's chroma equals the content's exactly
    (up to 8-bit rounding) instead of being bent by clipping.

``histogram`` (colour histogram matching)
    The style image's colours are mapped affinely so their mean and covariance
    equal the content's, ``x' = A (x - mu_s) + mu_c`` with
    ``A = Sigma_c^(1/2) Sigma_s^(-1/2)`` (symmetric matrix square roots: the
    "Image Analogies" variant of the paper; ``A Sigma_s A^T = Sigma_c``). The
    style target then depends on the content too. The mapped style is not
    clipped: it only feeds the network, which takes any real input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# ITU-R BT.601 luma coefficients and the chroma scales of full-range YCbCr.
_KR, _KG, _KB = 0.299, 0.587, 0.114
_CB_SCALE = 2.0 * (1.0 - _KB)  # 1.772
_CR_SCALE = 2.0 * (1.0 - _KR)  # 1.402

# A tiny ridge on the colour covariances, so a grey (rank-deficient) image has an inverse square root.
COVARIANCE_EPS = 1e-5


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """RGB ``[..., 3, H, W]`` in [0, 1] -> YCbCr (channels Y, Cb, Cr; chroma centred on 0.5)::

    Y = 0.299 R + 0.587 G + 0.114 B,   Cb = 0.5 + (B - Y) / 1.772,   Cr = 0.5 + (R - Y) / 1.402
    """
    r, g, b = rgb.unbind(-3)
    y = _KR * r + _KG * g + _KB * b
    return torch.stack([y, 0.5 + (b - y) / _CB_SCALE, 0.5 + (r - y) / _CR_SCALE], dim=-3)


def _chroma_offsets(cb: Tensor, cr: Tensor) -> Tensor:
    """RGB minus Y for chroma (Cb, Cr): ``[..., 3, H, W]`` (the inverse transform without Y)."""
    cb, cr = cb - 0.5, cr - 0.5
    off_r = _CR_SCALE * cr
    off_b = _CB_SCALE * cb
    off_g = -(_KR * off_r + _KB * off_b) / _KG
    return torch.stack([off_r, off_g, off_b], dim=-3)


def ycbcr_to_rgb(ycc: Tensor) -> Tensor:
    """The exact inverse of :func:`rgb_to_ycbcr` (no clipping)."""
    y, cb, cr = ycc.unbind(-3)
    return y.unsqueeze(-3) + _chroma_offsets(cb, cr)


def luminance(rgb: Tensor) -> Tensor:
    """``Y`` of an RGB image, ``[..., 1, H, W]``."""
    return rgb_to_ycbcr(rgb)[..., :1, :, :]


def grey(y: Tensor) -> Tensor:
    """A luminance ``[..., 1, H, W]`` as a grey RGB image ``[..., 3, H, W]`` (what the network sees)."""
    return y.expand(*y.shape[:-3], 3, *y.shape[-2:]).contiguous()


def match_luminance(style_y: Tensor, content_y: Tensor) -> Tensor:
    """``Y_s' = (sigma_c / sigma_s) (Y_s - mu_s) + mu_c``: the style's luminance with the content's mean and std."""
    mu_s, mu_c = style_y.mean(), content_y.mean()
    sigma_s, sigma_c = style_y.std(correction=0), content_y.std(correction=0)
    return (style_y - mu_s) * (sigma_c / sigma_s.clamp_min(1e-6)) + mu_c


def colour_statistics(image: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[3]`` and covariance ``[3, 3]`` of an image's pixel colours (float64, population covariance)."""
    x = image.reshape(3, -1).double()
    mean = x.mean(1)
    centred = x - mean[:, None]
    return mean, centred @ centred.T / x.shape[1]


def _sym_power(matrix: Tensor, power: float) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(1e-12).pow(power)) @ vectors.T


def match_colour_statistics(style: Tensor, content: Tensor, eps: float = COVARIANCE_EPS) -> Tensor:
    """The style image with the content's colour mean and covariance: ``A (x - mu_s) + mu_c``.

    ``A = (Sigma_c + eps I)^(1/2) (Sigma_s + eps I)^(-1/2)``. Computed in float64; not clipped.
    """
    mu_s, cov_s = colour_statistics(style)
    mu_c, cov_c = colour_statistics(content)
    ridge = eps * torch.eye(3, dtype=torch.float64)
    a = _sym_power(cov_c + ridge, 0.5) @ _sym_power(cov_s + ridge, -0.5)
    x = style.reshape(3, -1).double()
    mapped = a @ (x - mu_s[:, None]) + mu_c[:, None]
    return mapped.to(style.dtype).reshape(style.shape)


def network_inputs(
    mode: str, content: Tensor, styles: Sequence[Tensor], init: Tensor, *, init_is_style: bool = False
) -> tuple[Tensor, list[Tensor], Tensor]:
    """(content, styles, start image) as the optimisation sees them under colour mode ``mode``.

    ``luminance``: grey content, grey luminance-matched styles, grey start.
    ``histogram``: each style colour-matched to the content; the content unchanged, and the start
    too unless it is the style image (``init_is_style``: then matched as well, and clipped to [0, 1]).
    """
    if mode == "none":
        return content, list(styles), init
    if mode == "luminance":
        content_y = luminance(content)
        return grey(content_y), [grey(match_luminance(luminance(s), content_y)) for s in styles], grey(luminance(init))
    if mode == "histogram":
        start = match_colour_statistics(init, content).clamp(0, 1) if init_is_style else init
        return content, [match_colour_statistics(s, content) for s in styles], start
    raise ValueError(f"unknown color mode {mode!r}")


def output_image(mode: str, optimised: Tensor, content: Tensor) -> Tensor:
    """The result an optimised image ``[..., 3, H, W]`` stands for, in [0, 1].

    ``luminance``: the optimised image's ``Y`` with the content's Cb and Cr, ``Y`` limited to the range
    in which that colour is valid RGB (so no channel clips and the chroma is the content's). Other
    modes: the optimised image, clamped.
    """
    if mode != "luminance":
        return optimised.clamp(0, 1)
    ycc = rgb_to_ycbcr(content)
    offsets = _chroma_offsets(ycc[..., 1, :, :], ycc[..., 2, :, :])  # RGB = Y + offsets
    low = (-offsets).amax(-3, keepdim=True)  # Y >= -offset_k for every channel k
    high = (1.0 - offsets).amin(-3, keepdim=True)  # Y <= 1 - offset_k
    y = torch.minimum(torch.maximum(luminance(optimised), low), high)
    return (y + offsets).clamp(0, 1)
