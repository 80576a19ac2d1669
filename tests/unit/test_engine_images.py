"""Image input: every refusal is one line naming the file and the reason; every
Pillow mode becomes RGB; EXIF orientation is honoured; animations give their
first frame. Test images are written with Pillow in each case's real format."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
import torch
from helpers import sample_image
from PIL import Image

from nst_core import engine, images
from nst_core.errors import ImageError, NSTError
from nst_core.params import StyleParams


def _one_line_naming(exc: pytest.ExceptionInfo, name: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    assert name in message, message
    assert isinstance(exc.value, NSTError)
    return message


def _pixels(image: Image.Image) -> list:
    """Every pixel, row by row (``getdata`` is deprecated in Pillow 13)."""
    return [image.getpixel((x, y)) for y in range(image.height) for x in range(image.width)]


def _put(image: Image.Image, values: list) -> None:
    for i, v in enumerate(values):
        image.putpixel((i % image.width, i // image.width), v)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(sample_image("tubingen.jpg")).convert("RGB").resize((64, 48))


# --- refusals -----------------------------------------------------------------------------


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not the pixels you are looking for\n")
    with pytest.raises(ImageError) as exc:
        images.load_image(path)
    assert "not an image" in _one_line_naming(exc, str(path))


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_zero_bytes(tmp_path, as_bytes):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as exc:
        images.load_image(b"" if as_bytes else path, name=str(path))
    assert "empty" in _one_line_naming(exc, str(path))


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageError) as exc:
        images.load_image(path)
    _one_line_naming(exc, str(path))


@pytest.mark.parametrize("fmt, keep", [("PNG", 0.5), ("JPEG", 0.5), ("PNG", 0.9), ("JPEG", 0.9)])
def test_truncated_file(tmp_path, photo, fmt, keep):
    data = _encoded(photo, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError) as exc:
        images.load_image(path)
    assert "truncated" in _one_line_naming(exc, str(path))
    # the same bytes in full are fine
    assert images.load_image(data, name="whole").size == (64, 48)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels (and has no pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(65_000, 65_000))
    assert Image.open(path).size == (65_000, 65_000)  # what Pillow reads from the header
    with pytest.raises(ImageError) as exc:
        images.load_image(path)  # default max_pixels = 40,000,000
    message = _one_line_naming(exc, str(path))
    assert "65000x65000" in message and "max_pixels" in message


def test_max_pixels_setting_applies_to_real_images(tmp_path, photo):
    path = tmp_path / "photo.png"
    photo.save(path)
    assert images.load_image(path, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageError) as exc:
        images.load_image(path, max_pixels=64 * 48 - 1)
    assert "max_pixels=3,071" in _one_line_naming(exc, str(path))


def test_image_too_small_for_the_deepest_layer(photo):
    strip = photo.resize((40, 10))
    params = StyleParams(size=40, weights="random:0")  # default layers reach relu5_1: 16 px per side
    with pytest.raises(ImageError) as exc:
        engine.prepare_images(params, strip, photo)
    message = str(exc.value)
    assert "\n" not in message and "too small" in message and "40x10" in message and "16" in message
    # shallower layers need fewer px (relu3_1: two poolings, 4 px), so the same strip is usable
    shallow = params.with_overrides(content_layers=["relu3_1"], style_layers=["relu1_1", "relu3_1"])
    content, style, init = engine.prepare_images(shallow, strip, photo)
    assert content.shape == (3, 10, 40) and init.shape == content.shape
    # a style image made too small by style_scale is refused too, naming the style image
    with pytest.raises(ImageError, match="style image"):
        engine.prepare_images(StyleParams(size=64, style_scale=0.2, weights="random:0"), photo, photo)


# --- modes, orientation, animation --------------------------------------------------------


def _roundtrip(image: Image.Image, path: Path, expect_mode: str, **options) -> Image.Image:
    image.save(path, **options)
    with Image.open(path) as check:
        assert check.mode == expect_mode, f"the test file is {check.mode}, not {expect_mode}"
    loaded = images.load_image(path)
    assert loaded.mode == "RGB"
    return loaded


def test_rgba_becomes_rgb_over_white(tmp_path):
    im = Image.new("RGBA", (3, 1))
    _put(im, [(200, 10, 10, 255), (0, 0, 200, 0), (0, 0, 0, 128)])
    out = _roundtrip(im, tmp_path / "rgba.png", "RGBA")
    px = _pixels(out)
    assert px[0] == (200, 10, 10)
    assert px[1] == (255, 255, 255)  # fully transparent -> the white background
    assert all(abs(v - 127) <= 1 for v in px[2])  # half black over white


def test_la_becomes_rgb(tmp_path):
    im = Image.new("LA", (2, 1))
    _put(im, [(100, 255), (0, 0)])
    out = _roundtrip(im, tmp_path / "la.png", "LA")
    assert _pixels(out) == [(100, 100, 100), (255, 255, 255)]


def test_palette_becomes_rgb(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 6))
    _put(im, [0, 1])
    out = _roundtrip(im, tmp_path / "p.png", "P")
    assert _pixels(out) == [(255, 0, 0), (0, 128, 0)]


def test_cmyk_becomes_rgb(tmp_path):
    im = Image.new("CMYK", (2, 1))
    _put(im, [(0, 0, 0, 0), (0, 255, 255, 0)])  # white, red
    out = _roundtrip(im, tmp_path / "cmyk.tif", "CMYK")
    assert _pixels(out) == [(255, 255, 255), (255, 0, 0)]


def test_16_bit_greyscale_becomes_rgb_scaled(tmp_path):
    im = Image.new("I;16", (3, 1))
    _put(im, [0, 32768, 65535])
    out = _roundtrip(im, tmp_path / "grey16.png", "I;16")
    px = _pixels(out)
    assert px[0] == (0, 0, 0) and px[2] == (255, 255, 255)
    assert all(abs(v - 128) <= 1 for v in px[1])


def test_exif_orientation_is_honoured(tmp_path):
    im = Image.new("RGB", (40, 20), (220, 0, 0))
    im.paste((0, 0, 220), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20) and raw.getexif().get(0x0112) == 6
    out = images.load_image(path)
    assert out.size == (20, 40)  # transposed
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 150 and top[2] < 80  # the left (red) half is now on top
    assert bottom[2] > 150 and bottom[0] < 80


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    out = images.load_image(path)
    assert out.mode == "RGB" and out.size == (8, 6)
    assert set(_pixels(out)) == {(255, 0, 0)}
    # also after something else moved the file to a later frame
    with Image.open(path) as opened:
        opened.seek(2)
        assert images.load_image(path.read_bytes(), name="anim").getpixel((0, 0)) == (255, 0, 0)


# --- sizes and tensors --------------------------------------------------------------------


def test_long_side_resize_keeps_the_aspect_ratio():
    image = images.load_image(sample_image("tubingen.jpg"))
    assert image.size == (1024, 768)
    t = images.resized_tensor(image, long_side=64)
    assert t.shape == (3, 48, 64) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    tall = image.transpose(Image.Transpose.ROTATE_90)
    assert images.resized_tensor(tall, long_side=64).shape == (3, 64, 48)
    assert images.resized_tensor(image, exact=(50, 30)).shape == (3, 30, 50)


def test_tensor_round_trip_is_exact_for_8_bit_images(photo):
    t = images.to_tensor(photo)
    assert _pixels(images.to_pil(t)) == _pixels(photo)
    out = images.load_image(images.encode(images.to_pil(t), "png"), name="png")
    assert _pixels(out) == _pixels(photo)
    with pytest.raises(ValueError):
        images.encode(photo, "gif")
