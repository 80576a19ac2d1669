"""Small helpers shared by the engine tests (plain functions, no fixtures).

* :func:`sample_images_dir` / :func:`sample_image`: the real sample images of the
  ``nst_samples`` package (in the repository); a test that needs one fails with a
  clear reason when it is absent.
* :func:`psnr`: peak signal-to-noise ratio of two ``[3, H, W]`` tensors in [0, 1].
* :func:`stacked_targets`: per-item content/style targets stacked into one batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest


def sample_images_dir() -> Path:
    """The folder of the ``nst_samples`` package."""
    import nst_samples

    return nst_samples.folder()


def sample_image(name: str) -> Path:
    """Path of a sample image; fails the calling test when it is not there (never a silent skip)."""
    path = sample_images_dir() / name
    if not path.is_file():
        pytest.fail(f"sample image {path} not found (the nst_samples package is incomplete)", pytrace=False)
    return path


def psnr(a, b) -> float:
    """PSNR in dB of two images in [0, 1] (both clamped first); inf when identical."""
    mse = float((a.clamp(0, 1) - b.clamp(0, 1)).double().square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def stacked_targets(network, params, contents, styles):
    """Content features and style Grams of each (content, style) pair, stacked as a batch."""
    import torch

    from nst_core import engine

    c = [engine.content_targets(network, t, params.content_layers) for t in contents]
    s = [engine.style_targets(network, t, params.style_layers) for t in styles]
    return (
        {k: torch.cat([t[k] for t in c]) for k in params.content_layers},
        {k: torch.cat([t[k] for t in s]) for k in params.style_layers},
    )
