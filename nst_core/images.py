"""Image input and output: bytes or files in, RGB tensors in [0, 1] out, and back.

Every refusal is an :class:`ImageError` with one line naming the image and the
reason: not an image (or not one of :data:`INPUT_FORMATS`), truncated, too many
pixels (decompression bomb), too small for the network's deepest layer.

Hostile files:

* only the formats of :data:`INPUT_FORMATS` are opened (Pillow would otherwise
  try some 40 others, EPS among them, whose loader runs Ghostscript);
* the pixel count comes from the header and is checked against ``max_pixels``
  before anything is decoded;
* PNG text chunks (``tEXt``/``zTXt``/``iTXt``) larger than
  :data:`MAX_PNG_TEXT_BYTES` (raw, or once decompressed), or beyond
  :data:`MAX_PNG_TEXT_TOTAL` in all, are ignored: the chunks are skipped before
  Pillow parses them, so a 50 MB comment or a zTXt "zip bomb" costs neither
  memory nor a refusal (the pixels are what is used);
* JPEG metadata segments (APPn, COM) are kept up to :data:`JPEG_METADATA_BUDGET`
  bytes in all, and only the first EXIF segment (the one with the orientation):
  the rest are skipped before Pillow parses them, which would concatenate every
  EXIF segment into one ever-growing buffer (quadratic time: a 128 MB file of
  EXIF segments took a minute to open);
* any error Pillow raises while reading the header or decoding becomes an
  :class:`ImageError` (never a bare ``ValueError`` that would fail a batch).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported by the tensor conversions only: decoding and sizes need none
    from torch import Tensor

from nst_core.errors import ImageError

# We enforce our own limit (max_pixels) before decoding, with our own message.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Pillow format ids the loader opens (multi-picture JPEGs from phone cameras open as JPEG).
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "PPM")
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, TIFF, BMP, PPM"

FILE_METADATA_ALLOWANCE = 16 << 20  # EXIF, ICC profiles, XMP, PNG text: bytes an image file may hold beside its pixels


def max_file_bytes(max_pixels: int) -> int:
    """The largest input file worth reading for ``max_pixels``: uncompressed 16-bit RGBA (8 bytes per
    pixel, the widest format the loader opens) plus metadata. Larger files are refused unread."""
    return 8 * max_pixels + FILE_METADATA_ALLOWANCE


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_TEXT_BYTES = 1 << 20  # per text chunk, raw or decompressed (Pillow's own PngImagePlugin.MAX_TEXT_CHUNK)
MAX_PNG_TEXT_TOTAL = 8 << 20  # all kept text chunks together
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
JPEG_METADATA_BUDGET = 1 << 20  # APPn/COM bytes of a JPEG kept in all (EXIF is one 64 KB segment; ICC profiles fit)
_PNG_ORIENTATION_KEYWORDS = (b"XML:com.adobe.xmp", b"Raw profile type exif", b"Raw profile type APP1")
_READ_BLOCK = 1 << 16
# What Pillow raises on corrupt or hostile files (its plugins use all of these).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

ImageSource = str | os.PathLike[str] | bytes


def _inflated_size(fp: BinaryIO, start: int, stop: int, limit: int) -> int:
    """Bytes that the zlib stream in ``fp[start:stop]`` inflates to, counted up to ``limit + 1``; 0 if corrupt."""
    inflater = zlib.decompressobj()
    produced = 0
    fp.seek(start)
    remaining = stop - start
    try:
        while remaining > 0 and produced <= limit:
            block = fp.read(min(_READ_BLOCK, remaining))
            if not block:
                break
            remaining -= len(block)
            produced += len(inflater.decompress(block, limit + 1 - produced))
            if inflater.unconsumed_tail:
                return limit + 1
    except zlib.error:
        return 0  # Pillow drops corrupt compressed text itself
    return produced


def _png_text_size(fp: BinaryIO, kind: bytes, start: int, length: int) -> int:
    """The size of a PNG text chunk's text once decompressed (capped just above MAX_PNG_TEXT_BYTES)."""
    if kind == b"tEXt" or length > MAX_PNG_TEXT_BYTES * 1024:  # past any zlib ratio: too big either way
        return length
    fp.seek(start)
    head = fp.read(min(length, 4096))
    keyword_end = head.find(b"\0")
    if keyword_end < 0:
        return length
    if kind == b"zTXt":
        return _inflated_size(fp, start + keyword_end + 2, start + length, MAX_PNG_TEXT_BYTES)
    # iTXt: keyword \0 flag method language \0 translated-keyword \0 text
    flag = head[keyword_end + 1 : keyword_end + 2]
    language_end = head.find(b"\0", keyword_end + 3)
    translated_end = head.find(b"\0", language_end + 1) if language_end >= 0 else -1
    if translated_end < 0:
        return length  # a header longer than 4 KB: not text anyone needs
    if flag == b"\x01":
        return _inflated_size(fp, start + translated_end + 1, start + length, MAX_PNG_TEXT_BYTES)
    return length - translated_end - 1


def _png_chunks(fp: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(start, data length, type) of each whole chunk of a PNG up to IEND; nothing for other files.

    Reads the 8-byte chunk headers only; stops at a chunk that runs past the end (a truncated
    file is Pillow's to report).
    """
    fp.seek(0)
    if fp.read(8) != PNG_SIGNATURE:
        return
    size = fp.seek(0, os.SEEK_END)
    pos = 8
    while pos + 8 <= size:
        fp.seek(pos)
        header = fp.read(8)
        length, kind = int.from_bytes(header[:4], "big"), header[4:]
        if pos + 12 + length > size or kind == b"IEND":
            return
        yield pos, length, kind
        pos += 12 + length


def _oversized_png_text(fp: BinaryIO) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the PNG text chunks to skip; [] for other files."""
    drop: list[tuple[int, int]] = []
    kept = 0
    for pos, length, kind in list(_png_chunks(fp)):
        if kind in _PNG_TEXT_CHUNKS:
            text = _png_text_size(fp, kind, pos + 8, length)
            if text > MAX_PNG_TEXT_BYTES or kept + text > MAX_PNG_TEXT_TOTAL:
                drop.append((pos, pos + 12 + length))
            else:
                kept += text
    return drop


def _jpeg_metadata_to_skip(fp: BinaryIO) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the JPEG metadata segments to skip; [] for other files.

    Walks the segment headers up to the first scan (4 bytes read per segment, so
    linear in their number). Keeps the first EXIF segment and the APPn/COM
    segments that fit in :data:`JPEG_METADATA_BUDGET`; a marker it cannot follow
    ends the walk (a corrupt file is Pillow's to report).
    """
    fp.seek(0)
    if fp.read(2) != b"\xff\xd8":
        return []
    size = fp.seek(0, os.SEEK_END)
    pos, kept, seen_exif = 2, 0, False
    drop: list[tuple[int, int]] = []
    while pos + 4 <= size:
        fp.seek(pos)
        head = fp.read(4)
        if head[0] != 0xFF:
            break
        marker = head[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # segments without a length
            pos += 2
            continue
        length = int.from_bytes(head[2:4], "big")
        if marker in (0xDA, 0xD9) or length < 2 or pos + 2 + length > size:  # scan, end, or cut short
            break
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            exif = marker == 0xE1 and fp.read(6) == b"Exif\0\0"
            if exif and not seen_exif:
                seen_exif = True
                kept += length
            elif exif or kept + length > JPEG_METADATA_BUDGET:
                drop.append((pos, pos + 2 + length))
            else:
                kept += length
        pos += 2 + length
    return drop


def _metadata_to_skip(fp: BinaryIO) -> list[tuple[int, int]]:
    """Byte ranges of metadata a decoder must not parse (oversized PNG text, JPEG segments past the budget)."""
    return _oversized_png_text(fp) or _jpeg_metadata_to_skip(fp)


def _png_orientation_after_pixels(fp: BinaryIO) -> bool:
    """True when a chunk after a PNG's image data may hold an orientation (eXIf, XMP or raw-EXIF text).

    Pillow reads those only by decoding the whole image first.
    """
    seen_pixels = False
    for pos, length, kind in list(_png_chunks(fp)):
        if kind == b"IDAT":
            seen_pixels = True
        elif seen_pixels and kind == b"eXIf":
            return True
        elif seen_pixels and kind in _PNG_TEXT_CHUNKS:
            fp.seek(pos + 8)
            keyword = fp.read(min(length, 80)).split(b"\0", 1)[0]
            if keyword in _PNG_ORIENTATION_KEYWORDS:
                return True
    return False


def _without(fp: BinaryIO, drop: list[tuple[int, int]]) -> bytes:
    """The file's bytes with the ``drop`` ranges left out (whole chunks or segments: what is kept stays valid)."""
    parts = []
    pos = 0
    for start, end in [*drop, (fp.seek(0, os.SEEK_END), 0)]:
        fp.seek(pos)
        parts.append(fp.read(start - pos))
        pos = end
    return b"".join(parts)


def _open(source: ImageSource, name: str) -> Image.Image:
    """Open (header only) with Pillow, limited to INPUT_FORMATS, oversized PNG text and JPEG metadata skipped."""
    try:
        opened: BinaryIO | str | os.PathLike[str]
        if isinstance(source, bytes):
            if not source:
                raise ImageError(f"{name}: empty file (0 bytes)")
            opened = io.BytesIO(source)
            drop = _metadata_to_skip(opened)
            if drop:
                opened = io.BytesIO(_without(opened, drop))
            opened.seek(0)
        else:
            if not os.path.isfile(source):
                raise ImageError(f"{name}: no such file")
            if os.path.getsize(source) == 0:
                raise ImageError(f"{name}: empty file (0 bytes)")
            opened = source  # Pillow opens (and later closes) the file itself
            with open(source, "rb") as file:
                drop = _metadata_to_skip(file)
                if drop:
                    opened = io.BytesIO(_without(file, drop))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(opened, formats=INPUT_FORMATS)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file in a supported format ({_FORMAT_NAMES})") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - limits are disabled above
        raise ImageError(f"{name}: {exc}") from None
    except _DECODE_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{name}: cannot read the image header ({reason}); the file may be truncated or corrupt") from None


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
    except _DECODE_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{label}: cannot decode image ({reason}); the file may be truncated or corrupt") from None


def header_size(data: bytes, complete: bool = True) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientation applied), from the header only; None if unreadable.

    Never decodes: Pillow's ``getexif()`` on a PNG decodes the whole image (to find an ``eXIf`` chunk
    after the pixels), which for a PNG decompression bomb means gigabytes. For a PNG the metadata read
    with the header is used, and None is returned when a chunk after the pixels may rotate it.

    Args:
        data: the file's bytes, or only its first bytes.
        complete: False when ``data`` is only the start of the file: a PNG's chunks after the pixels
            are then unseen, so its displayed size is unknown (None).
    """
    try:
        with _open(data, "image") as image, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # corrupt EXIF: the orientation is then unknown, see below
            width, height = image.size
            if image.format == "PNG":
                if not complete or _png_orientation_after_pixels(io.BytesIO(data)):
                    return None
                exif = Image.Image.getexif(image)  # the base class: metadata parsed with the header only
            else:
                exif = image.getexif()
            orientation = exif.get(0x0112, 1)
    except Exception:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def fitted_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) with the long side set to ``long_side``, aspect ratio kept."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> float32 tensor ``[3, H, W]`` in [0, 1]."""
    import torch

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
    import torch

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
