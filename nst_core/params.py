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

Artistic controls (each a field like the others):

* ``style_blend_weights``: with several styles (``style_uri`` lists them,
  ``a|b``), one weight per style; :meth:`StyleParams.blend_weights` normalises
  them to sum 1. The target is ``sum_s w_s A_s``.
* ``style_masks``: one mask image per style (URIs, ``|``-separated only):
  guided Gram matrices. Inputs, like the images: in :meth:`identity` only their
  count; their bytes enter ``item_id`` through the item's inputs.
* ``color``: ``none``, ``luminance`` or ``histogram`` (:mod:`nst_core.color`).
* ``normalize_network``: the paper's normalised VGG-19 (:func:`nst_core.network.normalize_trunk`).
* ``save_every``: snapshots every N iterations; not part of the identity.

:meth:`StyleParams.check_styles` is the one place where the counts of the list
controls are checked against the number of styles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from nst_core.errors import ParamsError
from nst_core.layers import LAYER_NAMES
from nst_core.weights import WeightsSpec

INIT_KEYWORDS = ("content", "noise", "style")
MAX_STYLES = 8


def normalised_blend_weights(weights: Sequence[float] | None, n_styles: int) -> tuple[float, ...]:
    """The weight of each of ``n_styles`` styles, summing to 1: ``weights / sum(weights)``, or 1/S each when None.

    The one formula for a blend (the engine's style target and the export's ``style_weights``); counts are
    checked by :meth:`StyleParams.check_styles`, not here.
    """
    if weights is None:
        return tuple(1.0 / n_styles for _ in range(n_styles))
    total = sum(weights)
    return tuple(w / total for w in weights)


def input_role(kind: str, index: int) -> str:
    """The role name of the ``index``-th (0-based) ``style`` or ``style_mask``: ``style``, ``style_1``, ...

    Roles name the inputs whose sha256 enter ``item_id`` and ``meta.json``'s ``inputs``, and key the
    engine's ``Job.names``; the first keeps the plain name, so single-style items keep their ids.
    """
    return kind if index == 0 else f"{kind}_{index}"


DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
DEFAULT_CONTENT_LAYERS = ("relu4_2",)
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}

# Parameters that say how an item runs, not what it makes: reports and exports neither compare nor filter on them.
EXECUTION_FIELDS = frozenset({"device", "precision", "max_pixels", "progress_every"})
# Parameters that never change the stylised image; left out of an item's identity.
NON_OUTPUT_FIELDS = EXECUTION_FIELDS | {"save_every"}
# Artistic controls added after item ids were first issued: in an item's identity only when set away from
# their default (value given here), so the ids of items made without them stay valid.
IDENTITY_WHEN_SET: dict[str, Any] = {"style_blend_weights": None, "style_masks": None, "color": "none", "normalize_network": False}
# Parameters that may differ between the items of one batch (they only change an item's start or encoding).
BATCH_FREE_FIELDS = frozenset({"seed", "init", "output_format"})


def _check_one_per(value: tuple[Any, ...], name: str, info: ValidationInfo, other: str) -> None:
    """A list field with one value per item of an earlier field (its own validation error, naming ``name``)."""
    items = info.data.get(other)
    if items is not None and len(value) != len(items):
        raise ValueError(f"{name} has {len(value)} values for {len(items)} {other}")


def split_list(value: Any) -> Any:
    """``"a|b"`` or ``"a,b"`` (or a list) -> a list of stripped, non-empty strings."""
    if isinstance(value, str):
        sep = "|" if "|" in value else ","
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


def split_uris(value: Any) -> Any:
    """``"a|b"`` (or a list) -> a list of stripped strings; URIs are split on ``|`` only (commas may be in keys)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split("|")]
    return value


class StyleInputsError(ParamsError, ValueError):
    """Parameters that disagree with the row's inputs (a count of styles); ``field`` names the parameter."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.reason = message


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e7 else f"{value:g}"


def allowed_values(prop: dict[str, Any]) -> str:
    """The bounds of one JSON-schema property in words ("16 to 8192", "> 0 to 1000, or blank"); "" if none.

    Forms built from the schema (the Prefect UI's run form) show descriptions but not bounds.
    Enums are left out: forms show them as dropdowns.
    """
    if "anyOf" in prop:
        parts = [allowed_values(p) for p in prop["anyOf"] if p.get("type") != "null"]
        text = "; ".join(p for p in parts if p)
        nullable = any(p.get("type") == "null" for p in prop["anyOf"])
        return f"{text}, or blank" if text and nullable else text
    low = (">= ", prop["minimum"]) if "minimum" in prop else ("> ", prop["exclusiveMinimum"]) if "exclusiveMinimum" in prop else None
    high = ("<= ", prop["maximum"]) if "maximum" in prop else ("< ", prop["exclusiveMaximum"]) if "exclusiveMaximum" in prop else None
    if low and high:
        text = f"{_number(low[1])} to {_number(high[1])}" if low[0] == ">= " and high[0] == "<= " else f"{low[0]}{_number(low[1])} and {high[0]}{_number(high[1])}"
    elif low or high:
        op, value = low or high  # type: ignore[misc]
        text = f"{op}{_number(value)}"
    else:
        text = ""
    if prop.get("type") == "array" and ("minItems" in prop or "maxItems" in prop) and "enum" not in prop.get("items", {}):
        if "minItems" in prop and "maxItems" in prop:
            count = f"{prop['minItems']} to {prop['maxItems']} values"
        else:
            count = f"at most {prop['maxItems']} values" if "maxItems" in prop else f"at least {prop['minItems']} values"
        text = f"{text}; {count}" if text else count
    return text


def _describe_bounds(schema: dict[str, Any]) -> None:
    """Append each field's bounds to its description in StyleParams' JSON schema."""
    for prop in schema.get("properties", {}).values():
        allowed = allowed_values(prop)
        if allowed and prop.get("description"):
            prop["description"] = f"{prop['description'].rstrip()} Allowed: {allowed}."


class StyleParams(BaseModel):
    """Parameters of one Gatys et al. style transfer."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, json_schema_extra=_describe_bounds)

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
    content_layers: tuple[str, ...] = Field(DEFAULT_CONTENT_LAYERS, max_length=37, description="Layers whose features the output matches to the content image.", json_schema_extra={"items": {"type": "string", "enum": list(LAYER_NAMES)}})
    style_layers: tuple[str, ...] = Field(DEFAULT_STYLE_LAYERS, max_length=37, description="Layers whose Gram matrices the output matches to the style image.", json_schema_extra={"items": {"type": "string", "enum": list(LAYER_NAMES)}})
    style_layer_weights: tuple[float, ...] | None = Field(None, description="w_l per style layer (default: equal, 1/len(style_layers)).")
    pooling: Literal["avg", "max"] = Field("avg", description="Pooling in VGG-19: 'avg' (the paper's choice) or 'max'.")
    style_scale: float = Field(1.0, gt=0, le=8, description="Style image size relative to the output size.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image format of the stylised output in the pipeline.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="'auto' (CUDA when present), 'cpu' or 'cuda:N'. Does not change the result's identity.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="How VGG-19's convolutions compute: 'auto' (bfloat16 where the device does it natively: CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX; else float32), 'fp32' or 'bf16'. Pixels, Gram matrices and loss sums stay float32. Like device, does not change the result's identity.")
    max_pixels: int = Field(40_000_000, ge=1, le=1_000_000_000, description="Refuse input images with more pixels than this (decompression bombs).")
    # 0.003: the loosest tolerance whose stop kept both judged distances of every sample pair within 2 % of
    # 300 iterations' (benchmarks/multiscale.py, 4 pairs at 128 and 256 px; 0.005 left style 3-6 % worse).
    tolerance: float = Field(0.003, ge=0, le=1, description="Stop an image early when its best total loss improved by less than this fraction over the last 10 iterations (0 = run every iteration).")
    scales: tuple[float, ...] = Field((1.0,), min_length=1, max_length=8, description="Coarse-to-fine schedule: fractions of size, ascending, ending at 1 (e.g. 0.5|1). Each stage starts from the previous result, upsampled.")
    scale_iterations: tuple[int, ...] | None = Field(None, description="Iterations per stage of scales (default: iterations at every stage).")
    progress_every: int = Field(10, ge=1, le=100_000, description="Call the progress callback every N iterations.")
    # --- artistic controls (Gatys et al. 2017, and the classic implementations' options) ---
    style_blend_weights: tuple[float, ...] | None = Field(None, min_length=1, max_length=MAX_STYLES, description="With several styles (style URIs separated by '|'): one weight per style, normalised to sum 1; the style target is the weighted mix of their Gram matrices (blank = equal weights).")
    style_masks: tuple[str, ...] | None = Field(None, min_length=1, max_length=MAX_STYLES, description="One mask image per style ('|'-separated paths/URIs, in the order of the styles): white where that style goes, black where it does not (guided Gram matrices). Resized to the output.")
    color: Literal["none", "luminance", "histogram"] = Field("none", description="Colour preservation (Gatys et al. 2017): 'luminance' stylises the luminance only and keeps the content's colours; 'histogram' matches the style's colour mean and covariance to the content's first; 'none'.")
    normalize_network: bool = Field(False, description="Rescale VGG-19's filters so every channel's mean activation over a fixed calibration set is 1 (the network of Gatys et al. 2015).")
    save_every: int = Field(0, ge=0, le=100_000, description="Save a snapshot of the image every N iterations (0 = none). Does not change the result's identity.")

    @field_validator("content_layers", "style_layers", mode="before")
    @classmethod
    def _split_layers(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("style_layer_weights", "scales", "scale_iterations", "style_blend_weights", mode="before")
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

    @field_validator("style_layers")
    @classmethod
    def _some_layer(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        # Cross-field checks live on the later field (not in a model validator), so the error names a field:
        # the manifest's column, the CLI's flag and the run form's input.
        if not value and info.data.get("content_layers") == ():
            raise ValueError("at least one of content_layers and style_layers must be non-empty")
        return value

    @field_validator("style_layer_weights")
    @classmethod
    def _finite_weights(cls, value: tuple[float, ...] | None, info: ValidationInfo) -> tuple[float, ...] | None:
        if value is None:
            return None
        if any((not math.isfinite(w)) or w < 0 for w in value):
            raise ValueError("style layer weights must be finite and >= 0")
        _check_one_per(value, "style_layer_weights", info, "style_layers")
        return value

    @field_validator("style_blend_weights")
    @classmethod
    def _blend_weights(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is None:
            return None
        if any((not math.isfinite(w)) or w < 0 for w in value):
            raise ValueError("style blend weights must be finite and >= 0")
        if sum(value) <= 0:
            raise ValueError("style blend weights must not all be 0")
        return value

    @field_validator("style_masks", mode="before")
    @classmethod
    def _split_masks(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return split_uris(value)

    @field_validator("style_masks")
    @classmethod
    def _masks(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and any(not uri for uri in value):
            raise ValueError("a style mask is empty (write one image per style, separated by '|')")
        return value

    @field_validator("scales")
    @classmethod
    def _scales(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (0.05 <= f <= 1.0) or not math.isfinite(f) for f in value):
            raise ValueError("every scale must be between 0.05 and 1")
        if list(value) != sorted(set(value)) or value[-1] != 1.0:
            raise ValueError("scales must be strictly ascending and end at 1 (e.g. 0.5|1)")
        return value

    @field_validator("scale_iterations")
    @classmethod
    def _stage_iterations(cls, value: tuple[int, ...] | None, info: ValidationInfo) -> tuple[int, ...] | None:
        if value is None:
            return None
        if any(n < 0 or n > 100_000 for n in value):
            raise ValueError("iterations per stage must be between 0 and 100000")
        _check_one_per(value, "scale_iterations", info, "scales")
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
    def stages(self) -> list[tuple[int, int]]:
        """(long side in px, iterations) of each coarse-to-fine stage."""
        counts = self.scale_iterations or tuple(self.iterations for _ in self.scales)
        return [(max(16, round(self.size * f)), n) for f, n in zip(self.scales, counts, strict=True)]

    def batch_key(self) -> tuple[tuple[str, Any], ...]:
        """Items whose parameters agree on this can share one optimisation (seed and start may differ).

        Device and precision are in it though not in the identity: a row runs where it asked, or fails alone.
        """
        data = {**self.identity(), "device": self.device, "precision": self.precision}
        return tuple((k, repr(v)) for k, v in data.items() if k not in BATCH_FREE_FIELDS)

    @property
    def init_is_image(self) -> bool:
        return self.init not in INIT_KEYWORDS

    def blend_weights(self, n_styles: int) -> tuple[float, ...]:
        """w_s per style, summing to 1: ``style_blend_weights / sum(style_blend_weights)``, or 1/S each.

        Raises :class:`StyleInputsError` when the number of weights is not the number of styles.
        """
        self.check_styles(n_styles)
        return normalised_blend_weights(self.style_blend_weights, n_styles)

    def check_styles(self, n_styles: int) -> None:
        """Refuse a style count that the list parameters do not match (the one place counts are checked)."""
        if not 1 <= n_styles <= MAX_STYLES:
            raise StyleInputsError("style_uri", f"lists {n_styles} styles; 1 to {MAX_STYLES} are supported")
        for name in ("style_blend_weights", "style_masks"):
            values = getattr(self, name)
            if values is not None and len(values) != n_styles:
                raise StyleInputsError(name, f"has {len(values)} values for {n_styles} styles (one per style, '|'-separated)")

    def identity(self) -> dict[str, Any]:
        """The parameters that change the output, as JSON-ready values (for ``item_id``).

        Blend weights enter normalised (``2|2`` is ``1|1`` is blank); masks enter as their count (their
        bytes enter ``item_id`` as inputs, not their URIs); the controls of :data:`IDENTITY_WHEN_SET`
        only when set.
        """
        data = self.model_dump(mode="json")
        data["lr"] = self.effective_lr
        if self.style_blend_weights is not None:
            weights = self.blend_weights(len(self.style_blend_weights))
            data["style_blend_weights"] = None if len(set(weights)) == 1 else list(weights)
        if self.style_masks is not None:
            data["style_masks"] = len(self.style_masks)
        return {
            k: v
            for k, v in sorted(data.items())
            if k not in NON_OUTPUT_FIELDS and not (k in IDENTITY_WHEN_SET and v == IDENTITY_WHEN_SET[k])
        }

    def with_overrides(self, **changes: Any) -> StyleParams:
        """A validated copy with some fields changed (``model_copy`` does not validate)."""
        return type(self).model_validate({**self.model_dump(), **changes})
