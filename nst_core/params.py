"""The style parameters: one pydantic model for the CLI, manifests, the flow and metadata.

Every field here is a flag of ``nst stylize`` (``--style-weight``), a manifest
column (``style_weight``), a field of the Prefect UI's form and a key of
``meta.json``. List values are written ``a|b|c`` (the CLI also accepts
``a,b,c``).

Loss normalisation, and what ``content_weight`` (alpha) and ``style_weight``
(beta) mean:

* ``target`` (default, scale-free): every term is divided by its target's
  energy, so each is a relative squared error::

      content_l = sum (F - P)^2 / sum P^2
      style_l   = sum (G - A)^2 / sum A^2

  alpha/beta are then the relative importance of content and style, and the
  same values work at every image size and for every weights file.

* ``paper``: the exact forms of Gatys et al. (2015)::

      content_l = 1/2 sum (F - P)^2
      style_l   = sum (G - A)^2 / (4 N_l^2 M_l^2)

  whose magnitudes move with the image size and the network's activation
  scale; alpha/beta must be re-tuned per size and weights (the paper used
  alpha/beta of 1e-3 to 1e-4 with its normalised network).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nst_core.network import LAYER_NAMES, WeightsSpec

INIT_KEYWORDS = ("content", "noise", "style")

DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
DEFAULT_CONTENT_LAYERS = ("relu4_2",)
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}

# Parameters that never change the stylised image; left out of an item's identity.
NON_OUTPUT_FIELDS = frozenset({"device", "max_pixels", "progress_every"})


def split_list(value: Any) -> Any:
    """``"a|b"`` or ``"a,b"`` (or a list) -> a list of stripped, non-empty strings."""
    if isinstance(value, str):
        sep = "|" if "|" in value else ","
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


class StyleParams(BaseModel):
    """Parameters of one Gatys et al. style transfer."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    size: int = Field(512, ge=16, le=8192, description="Long side of the output in pixels (content image is resized to it, aspect ratio kept).")
    iterations: int = Field(300, ge=0, le=100_000, description="Loss evaluations (one forward + backward each), for L-BFGS and Adam alike.")
    optimizer: Literal["lbfgs", "adam"] = Field("lbfgs", description="L-BFGS (the paper's) or Adam.")
    lr: float | None = Field(None, gt=0, le=1e3, description="Step size; blank = the optimizer's default (L-BFGS: 1.0, its classic fixed step; Adam: 0.02, in units of [0, 1] pixels).")
    weights: str = Field("imagenet", description="VGG-19 weights: 'imagenet', 'random:SEED' (untrained, for tests/offline), or a path / s3:// URI of a VGG-19 state dict.")
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="Optional sha256 a weights file must have.")
    content_weight: float = Field(1.0, ge=0, le=1e12, description="alpha: weight of the content term.")
    style_weight: float = Field(1e3, ge=0, le=1e12, description="beta: weight of the style term.")
    tv_weight: float = Field(0.0, ge=0, le=1e12, description="gamma: weight of the total-variation (smoothness) term.")
    loss_normalization: Literal["target", "paper"] = Field("target", description="'target': each term divided by its target's energy (scale-free); 'paper': the paper's exact formulas.")
    init: str = Field("content", min_length=1, description="Starting image: 'content', 'noise' (the paper's white noise), 'style', or an image path/URI.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Random seed (noise init); same seed and parameters give the same image on the same machine.")
    content_layers: tuple[str, ...] = Field(DEFAULT_CONTENT_LAYERS, max_length=37, description="Layers whose features the output matches to the content image.")
    style_layers: tuple[str, ...] = Field(DEFAULT_STYLE_LAYERS, max_length=37, description="Layers whose Gram matrices the output matches to the style image.")
    style_layer_weights: tuple[float, ...] | None = Field(None, description="w_l per style layer (default: equal, 1/len(style_layers)).")
    pooling: Literal["avg", "max"] = Field("avg", description="Pooling in VGG-19: 'avg' (the paper's choice) or 'max'.")
    style_scale: float = Field(1.0, gt=0, le=8, description="Style image size relative to the output size.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image format of the stylised output in the pipeline.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="'auto' (CUDA when present), 'cpu' or 'cuda:N'. Does not change the result's identity.")
    max_pixels: int = Field(40_000_000, ge=1, le=1_000_000_000, description="Refuse input images with more pixels than this (decompression bombs).")
    progress_every: int = Field(10, ge=1, le=100_000, description="Call the progress callback every N iterations.")

    @field_validator("content_layers", "style_layers", mode="before")
    @classmethod
    def _split_layers(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("style_layer_weights", mode="before")
    @classmethod
    def _split_weights(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return split_list(value)

    @field_validator("content_layers", "style_layers")
    @classmethod
    def _known_layers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name not in LAYER_NAMES:
                raise ValueError(f"unknown VGG-19 layer {name!r} (known: conv1_1, relu1_1, ..., relu4_2, ..., pool5)")
        if len(set(value)) != len(value):
            raise ValueError("a layer is listed twice")
        return value

    @field_validator("style_layer_weights")
    @classmethod
    def _finite_weights(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and any((not math.isfinite(w)) or w < 0 for w in value):
            raise ValueError("style layer weights must be finite and >= 0")
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        WeightsSpec.parse(value)
        return value.strip()

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> "StyleParams":
        if not self.content_layers and not self.style_layers:
            raise ValueError("at least one of content_layers and style_layers must be non-empty")
        if self.style_layer_weights is not None and len(self.style_layer_weights) != len(self.style_layers):
            raise ValueError(
                f"style_layer_weights has {len(self.style_layer_weights)} values for {len(self.style_layers)} style_layers"
            )
        return self

    # --- derived values, each decided here and nowhere else ---------------------------

    @property
    def layer_weights(self) -> dict[str, float]:
        """w_l for every style layer (equal weights 1/L unless given)."""
        if self.style_layer_weights is not None:
            return dict(zip(self.style_layers, self.style_layer_weights, strict=True))
        return {name: 1.0 / len(self.style_layers) for name in self.style_layers}

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[self.optimizer]

    @property
    def init_is_image(self) -> bool:
        return self.init not in INIT_KEYWORDS

    def identity(self) -> dict[str, Any]:
        """The parameters that change the output, as JSON-ready values (for ``item_id``)."""
        data = self.model_dump(mode="json")
        data["lr"] = self.effective_lr
        return {k: v for k, v in sorted(data.items()) if k not in NON_OUTPUT_FIELDS}

    def with_overrides(self, **changes: Any) -> "StyleParams":
        """A validated copy with some fields changed (``model_copy`` does not validate)."""
        return type(self).model_validate({**self.model_dump(), **changes})
