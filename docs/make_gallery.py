"""Make docs/gallery.md and docs/gallery/*.jpg: each artistic control on the sample images.

    .venv/bin/python docs/make_gallery.py                     # about 15-25 minutes on a 2-core CPU
    .venv/bin/python docs/make_gallery.py --size 128 --iterations 40 --out /tmp/g   # a quick look

Uses the engine exactly as ``nst stylize`` does (``nst_core.engine.stylize``), with
``random:0`` weights: ImageNet weights cannot be downloaded where this gallery was
made, and untrained VGG-19 weights still transfer colour and texture. Sample images
come from the ``nst_samples`` package.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nst_samples  # noqa: E402
from nst_core import engine, images  # noqa: E402
from nst_core.params import StyleParams  # noqa: E402

WEIGHTS = "random:0"
JPEG_QUALITY = 82


def sample_dir() -> Path:
    return nst_samples.folder()


def load(name: str) -> Image.Image:
    return images.load_image(sample_dir() / name)


def save(image: Image.Image, out: Path, name: str, long_side: int | None = None) -> str:
    if long_side is not None:
        image = image.resize(images.fitted_size(*image.size, long_side), Image.Resampling.LANCZOS)
    image.convert("RGB").save(out / name, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return f"gallery/{name}"


def sky_mask(content: Image.Image, fraction: float) -> tuple[Image.Image, Image.Image]:
    """White above ``fraction`` of the height (the sky), and its inverse."""
    top = Image.new("L", content.size, 0)
    ImageDraw.Draw(top).rectangle((0, 0, content.size[0], int(content.size[1] * fraction)), fill=255)
    bottom = Image.eval(top, lambda v: 255 - v)
    return top.convert("RGB"), bottom.convert("RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    out_dir = args.out / "gallery"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = StyleParams(size=args.size, iterations=args.iterations, weights=WEIGHTS, device="cpu")
    tubingen, hoover = load("tubingen.jpg"), load("hoovertowernight.jpg")
    starry, shipwreck = load("starry_night.jpg"), load("shipwreck.jpg")
    timings: list[tuple[str, float, int]] = []

    def run(label: str, content, style, params: StyleParams, **kwargs) -> engine.StyleResult:
        started = time.perf_counter()
        result = engine.stylize(content, style, params, **kwargs)
        timings.append((label, time.perf_counter() - started, result.iterations))
        print(f"{label}: {result.iterations} iterations, {timings[-1][1]:.0f} s", file=sys.stderr)
        return result

    thumb = args.size * 2 // 3
    inputs = {name: save(img, out_dir, f"input-{name}.jpg", thumb) for name, img in
              (("tubingen", tubingen), ("hoover", hoover), ("starry", starry), ("shipwreck", shipwreck))}  # fmt: skip

    baseline = run("baseline", tubingen, starry, base)
    img = {"baseline": save(baseline.to_pil(), out_dir, "baseline.jpg")}

    for name, weights in (("blend-1-1", "1|1"), ("blend-0-1", "0|1")):
        result = run(name, tubingen, [starry, shipwreck], base.with_overrides(style_blend_weights=weights))
        img[name] = save(result.to_pil(), out_dir, f"{name}.jpg")

    # lr 0.5: with the default fixed L-BFGS step (1.0) this pair diverged under color=histogram (see the page)
    for mode in ("none", "luminance", "histogram"):
        result = run(f"color-{mode}", hoover, starry, base.with_overrides(color=mode, lr=0.5))
        img[f"color-{mode}"] = save(result.to_pil(), out_dir, f"color-{mode}.jpg")

    top, bottom = sky_mask(tubingen, 0.42)
    img["mask"] = save(top, out_dir, "mask-sky.jpg", thumb)
    result = run("masks", tubingen, [starry, shipwreck], base.with_overrides(style_masks="sky.png|rest.png"), style_masks=[top, bottom])
    img["masked"] = save(result.to_pil(), out_dir, "masks.jpg")

    paper = base.with_overrides(loss_normalization="paper", style_weight=1e4, content_weight=1.0)
    for flag in (False, True):
        name = f"normalize-{str(flag).lower()}"
        result = run(name, tubingen, starry, paper.with_overrides(normalize_network=flag))
        img[name] = save(result.to_pil(), out_dir, f"{name}.jpg")

    every = max(1, args.iterations // 6)
    snap = run("snapshots", tubingen, starry, base.with_overrides(init="noise", save_every=every, tolerance=0))
    strip = [s for s in snap.snapshots][:6]
    small = args.size // 2
    frames = [im.resize(images.fitted_size(*im.size, small), Image.Resampling.LANCZOS) for _, im in strip]
    canvas = Image.new("RGB", (sum(f.size[0] for f in frames) + 4 * (len(frames) - 1), frames[0].size[1]), "white")
    x = 0
    for frame in frames:
        canvas.paste(frame, (x, 0))
        x += frame.size[0] + 4
    img["snapshots"] = save(canvas, out_dir, "snapshots.jpg")
    snap_labels = ", ".join(str(i) for i, _ in strip)

    total = sum(t for _, t, _ in timings)
    page = f"""# Gallery: the artistic controls

Made by `docs/make_gallery.py` (`.venv/bin/python docs/make_gallery.py`), with the engine exactly as
`nst stylize` runs it, at {args.size} px, {args.iterations} iterations (L-BFGS, default early stopping),
on the sample images of `nst_samples/`.

> **These use untrained, seeded random VGG-19 weights (`weights=random:0`).** ImageNet weights
> cannot be downloaded on the machine this gallery was made on. Random-weight VGG-19 still transfers
> colour and texture, so each control's effect shows, but the textures are cruder than the paper's.
> With ImageNet weights the same commands give the familiar results.

Inputs: content images and style images.

| tubingen.jpg | hoovertowernight.jpg | starry_night.jpg | shipwreck.jpg |
|---|---|---|---|
| ![]({inputs['tubingen']}) | ![]({inputs['hoover']}) | ![]({inputs['starry']}) | ![]({inputs['shipwreck']}) |

## Several styles with blend weights

`nst stylize tubingen.jpg 'starry_night.jpg|shipwreck.jpg' --style-blend-weights '1|1' -o out.png`
(manifest: `style_uri` = `starry_night.jpg|shipwreck.jpg`, column `style_blend_weights`). The style
target is `sum_s w_s A_s`, the weights normalised to sum 1; `1|0` is exactly the single-style result
(tested bit for bit), so the first image is also that.

| `1\\|0` (= starry_night alone) | `1\\|1` | `0\\|1` (= shipwreck alone) |
|---|---|---|
| ![]({img['baseline']}) | ![]({img['blend-1-1']}) | ![]({img['blend-0-1']}) |

## Colour preservation (`color`)

`--color luminance|histogram` on hoovertowernight.jpg with starry_night.jpg. `luminance` stylises the
luminance only (YCbCr; the style's luminance first matched in mean and variance to the content's) and
keeps the photo's own chroma; `histogram` first gives the painting the photo's colour mean and covariance.
This row uses `--lr 0.5`: with the default fixed L-BFGS step of 1.0, the `histogram` run of this pair
diverged at about iteration 40 (total loss 1.4 -> 9400) and early stopping then ended it on the
diverged image, a property of the fixed-step optimiser rather than of the colour mode.

| `none` | `luminance` | `histogram` |
|---|---|---|
| ![]({img['color-none']}) | ![]({img['color-luminance']}) | ![]({img['color-histogram']}) |

## Spatial control (`style_masks`)

`--style-masks 'sky.png|rest.png'` with styles `starry_night.jpg|shipwreck.jpg`: one mask per style
(white where it goes), guided Gram matrices. The sky takes The Starry Night, the town The Shipwreck.

| mask of the first style | result |
|---|---|
| ![]({img['mask']}) | ![]({img['masked']}) |

## The normalised network (`normalize_network`)

With `loss_normalization=paper` (the paper's formulas, alpha=1, beta=10^4: the paper's alpha/beta of 1e-4), where the activation
scale of each layer matters: the plain network vs the one rescaled so that every channel's mean
activation over the calibration images is 1 (as in the paper). With the plain random network every
Gram term is tiny (1e-5 at `relu1_1` down to 1e-9 at `relu5_1`), so the paper's alpha/beta leave
the photo nearly as it is; normalised, every layer's term is of order 1 and the style comes through.

| `normalize_network=false` | `normalize_network=true` |
|---|---|
| ![]({img['normalize-false']}) | ![]({img['normalize-true']}) |

## Snapshots (`save_every`)

`--save-every {every} --init noise`: the image as it forms from white noise, iterations {snap_labels}
(`OUT.snap-NNNNN.png` from `nst stylize`, `items/<item_id>/snapshots/iter-NNNNN.png` from the flow,
listed in `meta.json` under `snapshots`).

![]({img['snapshots']})

---
Made in {total / 60:.0f} minutes of wall time on the CPU ({len(timings)} runs).
"""
    (args.out / "gallery.md").write_text(page)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {args.out / 'gallery.md'} and {len(list(out_dir.iterdir()))} images ({size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
