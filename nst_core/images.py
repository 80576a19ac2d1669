"""Image input and output: bytes or files in, RGB tensors in [0, 1] out, and back.

Every refusal is an :class:`ImageError` with one line naming the image and the
reason: not an image, truncated, too many pixels (decompression bomb), too
small for the network's deepest layer.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor

from nst_core.errors import ImageError

# We enforce our own limit (max_pixels) before decoding, with our own message.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

ImageSource = str | os.PathLike[str] | bytes


def _open(source: ImageSource, name: str) -> Image.Image:
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageError(f"{name}: empty file (0 bytes)")
            return Image.open(io.BytesIO(source))
        if not os.path.isfile(source):
            raise ImageError(f"{name}: no such file")
        if os.path.getsize(source) == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
        return Image.open(source)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - limits are disabled above
        raise ImageError(f"{name}: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha over white, 16-bit and float scaled, CMYK/P/LA converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if image.mode == "F":
            top = max(float(values.max()), 1e-12) if values.max() > 1.0 else 1.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_image(source: ImageSource, *, name: str | None = None, max_pixels: int = 40_000_000) -> Image.Image:
    """Open, check and decode an image to RGB (EXIF orientation applied; first frame of animations).

    ``source`` is a local path or the file's bytes; ``name`` is how errors refer to it.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    image = _open(source, label)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,} "
            "(possible decompression bomb)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{label}: cannot decode image ({reason}); the file may be truncated or corrupt") from None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientation applied), from the header only; None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def fitted_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) with the long side set to ``long_side``, aspect ratio kept."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> float32 tensor ``[3, H, W]`` in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def resized_tensor(image: Image.Image, *, long_side: int | None = None, exact: tuple[int, int] | None = None) -> Tensor:
    """Resize (Lanczos) by long side, or to an exact (width, height), then to a tensor."""
    size = exact if exact is not None else fitted_size(*image.size, long_side or max(image.size))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return to_tensor(image)


MASK_ASPECT_TOLERANCE = 0.02


def mask_tensor(image: Image.Image, size: tuple[int, int], label: str = "mask") -> Tensor:
    """A mask image -> ``[1, H, W]`` in [0, 1] at ``size`` = (width, height): its luminance, box-filtered.

    White (1) marks the region, black (0) the rest; grey values weight it. Refused when its aspect
    ratio differs from ``size``'s by more than 2 % (a mask drawn for another image) or when it is all black.
    """
    width, height = size
    ratio, want = image.size[0] / image.size[1], width / height
    if abs(ratio / want - 1.0) > MASK_ASPECT_TOLERANCE:
        raise ImageError(
            f"{label}: aspect ratio {image.size[0]}x{image.size[1]} does not match the content image's "
            f"{width}x{height} (a mask must be drawn on the content image)"
        )
    grey = image.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BOX)
    array = np.asarray(grey, dtype=np.float32) / 255.0
    if float(array.max()) <= 0.0:
        raise ImageError(f"{label}: the mask is all black (its style would apply nowhere)")
    return torch.from_numpy(array.copy()).unsqueeze(0)


def check_min_side(tensor: Tensor, min_side: int, label: str) -> None:
    """Refuse an image smaller than the network's deepest layer needs."""
    h, w = tensor.shape[-2:]
    if min(h, w) < min_side:
        raise ImageError(
            f"{label}: {w}x{h} px is too small; the deepest layer asked for needs at least {min_side} px per side"
        )


def to_pil(tensor: Tensor) -> Image.Image:
    """Tensor ``[3, H, W]`` (any range) -> RGB image, clamped to [0, 1] and rounded."""
    array = tensor.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def encode(image: Image.Image, fmt: str = "png") -> bytes:
    """Encode as png / jpeg / webp bytes."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} not one of {', '.join(OUTPUT_FORMATS)}")
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt in ("jpeg", "webp") else {}
    image.save(buffer, format=OUTPUT_FORMATS[fmt], **options)
    return buffer.getvalue()
