"""Artistic controls (issue 4): several styles with blend weights, colour preservation,
the normalised network, spatial control with masks, snapshots; and their validation.

Each control is checked to change the output the way it claims, measurably, on the
real sample images at 32-64 px with a few iterations and seeded random weights
(``random:0``); the task path (manifest row -> item id -> fetch -> engine -> stored
files and meta.json) is run without a Prefect server by calling the task functions.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from helpers import sample_image
from PIL import Image, ImageOps
from pydantic import ValidationError

from nst_core import color, engine, images
from nst_core.errors import ImageError
from nst_core.layers import LAYER_NAMES
from nst_core.losses import guided_gram, layer_mask, mean_gram
from nst_core.network import MEAN_FLOOR, calibration_images, channel_means, load_network
from nst_core.params import StyleInputsError, StyleParams
from nst_run import items
from nst_run.manifest import parse_manifest

WEIGHTS = "random:0"
SMALL = StyleParams(size=32, iterations=6, weights=WEIGHTS, device="cpu", tolerance=0)


def half_masks(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """White on the left half / white on the right half, at the image's size."""
    left = Image.new("L", image.size, 0)
    left.paste(255, (0, 0, image.size[0] // 2, image.size[1]))
    return left.convert("RGB"), ImageOps.invert(left).convert("RGB")


# --- several styles ----------------------------------------------------------------------------


def test_blend_weights_1_0_equal_the_single_style_result(tubingen, starry, shipwreck, net):
    single = engine.stylize(tubingen, starry, SMALL, network=net)
    blended = engine.stylize(tubingen, [starry, shipwreck], SMALL.with_overrides(style_blend_weights="1|0"), network=net)
    assert torch.equal(blended.image, single.image)
    assert blended.history == single.history
    # and the weights do something: an even blend (the default) is not the first style's result
    even = engine.stylize(tubingen, [starry, shipwreck], SMALL, network=net)
    assert float((even.image - single.image).abs().mean()) > 1e-3


def test_blend_target_is_the_weighted_mix_of_grams(starry, shipwreck, net):
    params = SMALL.with_overrides(style_blend_weights="3|1")
    job = engine.Job(starry, [starry, shipwreck], params)
    stage = [engine.stage_inputs(job)]
    targets, guidance = engine.batch_style_targets(net, params, stage)
    assert guidance is None
    a = engine.style_targets(net, stage[0].styles[0], params.style_layers)
    b = engine.style_targets(net, stage[0].styles[1], params.style_layers)
    for name in params.style_layers:
        torch.testing.assert_close(targets[name], 0.75 * a[name] + 0.25 * b[name])


def test_a_batch_may_mix_items_with_different_numbers_of_styles(tubingen, starry, shipwreck, net):
    two = SMALL.with_overrides(style_blend_weights="1|1", iterations=2)
    three = SMALL.with_overrides(iterations=2)
    assert two.batch_key() == three.batch_key()  # equal weights are the default: one batch
    jobs = [engine.Job(tubingen, [starry, shipwreck], two), engine.Job(tubingen, [starry, shipwreck, tubingen], three)]
    together = engine.stylize_batch(jobs, network=net)
    alone = engine.stylize(tubingen, [starry, shipwreck, tubingen], three, network=net)
    assert together[1].history[0]["total"] == pytest.approx(alone.history[0]["total"], rel=1e-5)
    assert together[0].history[0]["total"] != pytest.approx(alone.history[0]["total"], rel=1e-3)


# --- colour preservation ---------------------------------------------------------------------


def ycbcr(image: Image.Image) -> np.ndarray:
    """Pillow's own YCbCr (JPEG, BT.601 full range), as int arrays [H, W, 3]."""
    return np.asarray(image.convert("YCbCr"), dtype=np.int16)


def test_luminance_mode_keeps_the_contents_chroma_and_changes_its_luminance(tubingen, starry, net):
    params = SMALL.with_overrides(color="luminance", size=48, iterations=10)
    result = engine.stylize(tubingen, starry, params, network=net)
    out = ycbcr(result.to_pil())
    content = ycbcr(images.to_pil(images.resized_tensor(tubingen, long_side=params.size)))
    chroma_diff = np.abs(out[..., 1:] - content[..., 1:])
    assert chroma_diff.max() <= 2, chroma_diff.max()  # 8-bit rounding of RGB, then of Pillow's YCbCr
    luma_diff = np.abs(out[..., 0] - content[..., 0])
    assert luma_diff.mean() > 4, luma_diff.mean()  # the luminance was stylised
    plain = ycbcr(engine.stylize(tubingen, starry, params.with_overrides(color="none"), network=net).to_pil())
    assert np.abs(plain[..., 1:] - content[..., 1:]).mean() > 5 * max(chroma_diff.mean(), 0.1)  # without it, colour moves


def test_luminance_mode_feeds_grey_images_with_the_contents_luminance_statistics(tubingen, starry):
    inputs = engine.stage_inputs(engine.Job(tubingen, starry, SMALL.with_overrides(color="luminance")))
    for image in (inputs.content, *inputs.styles, inputs.init):
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey
    y_c, y_s = color.luminance(inputs.colour_content), inputs.styles[0][:1]
    assert float(y_s.mean()) == pytest.approx(float(y_c.mean()), abs=1e-5)
    assert float(y_s.std(correction=0)) == pytest.approx(float(y_c.std(correction=0)), rel=1e-4)


def test_ycbcr_round_trip_is_exact_and_matches_pillow(tubingen):
    rgb = images.resized_tensor(tubingen, long_side=40)
    torch.testing.assert_close(color.ycbcr_to_rgb(color.rgb_to_ycbcr(rgb)), rgb, rtol=0, atol=1e-6)
    ours = (color.rgb_to_ycbcr(rgb) * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(ours - ycbcr(images.to_pil(rgb))).max() <= 1


def test_histogram_matching_gives_the_style_the_contents_colour_mean_and_covariance(tubingen, starry):
    content = images.resized_tensor(tubingen, long_side=64)
    style = images.resized_tensor(starry, long_side=64)
    matched = color.match_colour_statistics(style, content)
    mean_c, cov_c = color.colour_statistics(content)
    mean_m, cov_m = color.colour_statistics(matched)
    mean_s, cov_s = color.colour_statistics(style)
    torch.testing.assert_close(mean_m, mean_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(cov_m, cov_c, rtol=0, atol=1e-3 * float(cov_c.abs().max()))
    assert float((cov_s - cov_c).abs().max()) > 0.1 * float(cov_c.abs().max())  # they did differ
    assert float((mean_s - mean_c).abs().max()) > 0.02


def test_histogram_mode_style_targets_depend_on_the_content_and_are_cached_by_it(tubingen, shipwreck, starry, net):
    cache = engine.StyleTargetCache()
    params = SMALL.with_overrides(color="histogram")
    for content in (tubingen, shipwreck.resize(tubingen.size), tubingen):
        inputs = engine.stage_inputs(engine.Job(content, starry, params))
        cache.get(net, inputs.styles[0], params.style_layers)
    assert (cache.misses, cache.hits) == (2, 1)  # two contents -> two targets; the same content again -> a hit
    result = engine.stylize(tubingen, starry, params.with_overrides(iterations=4), network=net, cache=cache)
    plain = engine.stylize(tubingen, starry, params.with_overrides(iterations=4, color="none"), network=net)
    assert float((result.image - plain.image).abs().mean()) > 1e-3


# --- the normalised network ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def normalized_net():
    return load_network(WEIGHTS, pooling="max", device="cpu", normalize=True)


def divisors(mu: torch.Tensor) -> torch.Tensor:
    """What normalisation divides a channel by: its mean, or the floor for a channel that hardly fires."""
    return mu.clamp_min(MEAN_FLOOR * float(mu.median()))


def test_normalised_network_mean_channel_activations_are_one(normalized_net):
    relus = [name for name in LAYER_NAMES if name.startswith("relu")]
    means = channel_means(normalized_net.features, calibration_images(), relus)
    plain = channel_means(load_network(WEIGHTS, pooling="max", device="cpu").features, calibration_images(), relus)
    for name, mu in means.items():
        calibrated = plain[name] >= MEAN_FLOOR * float(plain[name].median())
        # random weights leave some channels that hardly fire on any image (up to ~22 % in the deep layers)
        assert int(calibrated.sum()) >= 0.75 * mu.numel(), name
        torch.testing.assert_close(mu[calibrated], torch.ones_like(mu[calibrated]), rtol=0, atol=1e-3, msg=name)
        assert bool((mu[~calibrated] < 1).all()), name
    assert float(plain["relu3_1"].mean()) < 0.5  # the untouched network is not normalised


def test_normalised_network_is_its_own_cached_trunk(normalized_net, net):
    assert normalized_net.normalized and not net.normalized
    assert normalized_net.weights_id == net.weights_id == WEIGHTS
    avg = load_network(WEIGHTS, pooling="avg", device="cpu", normalize=True)
    assert avg is not normalized_net and avg is load_network(WEIGHTS, pooling="avg", device="cpu", normalize=True)
    assert avg.features.layers["conv2_1"].weight is normalized_net.features.layers["conv2_1"].weight  # shared parameters
    assert not torch.equal(avg.features.layers["conv2_1"].weight, net.features.layers["conv2_1"].weight)
    # rescaling changes each channel's scale and nothing else: a_c / mu_c, for either pooling
    layers = ["relu1_1", "relu3_1", "relu5_1"]
    mu = channel_means(load_network(WEIGHTS, pooling="max", device="cpu").features, calibration_images(), layers)
    x = calibration_images(count=1, size=32, seed=5)
    for layer in layers:
        scale = divisors(mu[layer]).view(1, -1, 1, 1)
        a, b = avg.features(x, [layer])[layer], net.features(x, [layer])[layer]
        torch.testing.assert_close(a, b / scale, rtol=1e-3, atol=1e-5 * float(a.abs().max()), msg=layer)


def test_normalize_network_runs_through_the_engine_with_separate_style_targets(tubingen, starry):
    cache = engine.StyleTargetCache()
    params = StyleParams(size=32, iterations=3, weights=WEIGHTS, device="cpu")
    a = engine.stylize(tubingen, starry, params, cache=cache)
    b = engine.stylize(tubingen, starry, params.with_overrides(normalize_network=True), cache=cache)
    assert cache.misses == 2 and cache.hits == 0  # the normalised network's Grams are not the plain one's
    assert not torch.equal(a.image, b.image)
    with pytest.raises(ValueError, match="normalize_network"):
        engine.stylize(tubingen, starry, params.with_overrides(normalize_network=True), network=load_network(WEIGHTS))


# --- spatial control ----------------------------------------------------------------------------


def region_gram_error(net, image: torch.Tensor, mask: torch.Tensor, style: torch.Tensor, layers) -> float:
    """Mean over ``layers`` of the relative error of the guided Gram of ``image`` in ``mask`` to ``style``'s Gram."""
    feats = net.features(image.unsqueeze(0), layers)
    style_feats = net.features(style.unsqueeze(0), layers)
    errors = []
    for name in layers:
        g = guided_gram(feats[name], layer_mask(mask[None], feats[name].shape[-2:]))
        a = mean_gram(style_feats[name])
        errors.append(float((g - a).square().sum() / a.square().sum()))
    return sum(errors) / len(errors)


def test_masks_confine_each_styles_gram_statistics_to_its_region(tubingen, starry, shipwreck, net):
    left, right = half_masks(tubingen)
    params = StyleParams(size=48, iterations=20, weights=WEIGHTS, device="cpu", tolerance=0, style_masks="l.png|r.png")
    result = engine.stylize(tubingen, [starry, shipwreck], params, style_masks=[left, right], network=net)
    swapped = engine.stylize(tubingen, [starry, shipwreck], params, style_masks=[right, left], network=net)
    h, w = result.image.shape[-2:]
    inner_left, inner_right = torch.zeros(1, h, w), torch.zeros(1, h, w)
    inner_left[..., : w * 2 // 5] = 1  # away from the seam
    inner_right[..., w - w * 2 // 5 :] = 1
    styles = [images.resized_tensor(s, long_side=48) for s in (starry, shipwreck)]
    layers = ["relu1_1", "relu2_1", "relu3_1"]
    err = {
        (which, region, style): region_gram_error(net, image, mask, styles[style], layers)
        for which, image in (("masked", result.image), ("swapped", swapped.image))
        for region, mask in (("left", inner_left), ("right", inner_right))
        for style in (0, 1)
    }
    # each region is closer to its own style than to the other, by a clear margin, and swapping the masks swaps that
    assert err["masked", "left", 0] < 0.5 * err["masked", "left", 1], err
    assert err["masked", "right", 1] < 0.5 * err["masked", "right", 0], err
    assert err["swapped", "left", 1] < 0.5 * err["swapped", "left", 0], err
    assert err["swapped", "right", 0] < 0.5 * err["swapped", "right", 1], err


def test_a_mask_of_ones_is_the_plain_gram(net, tubingen):
    x = images.resized_tensor(tubingen, long_side=32).unsqueeze(0)
    feats = net.features(x, ["relu2_1"])["relu2_1"]
    torch.testing.assert_close(guided_gram(feats, torch.ones(1, 1, *feats.shape[-2:])), mean_gram(feats))


def test_masks_are_refused_when_they_do_not_fit(tubingen, starry, shipwreck, net):
    left, right = half_masks(tubingen)
    params = SMALL.with_overrides(iterations=1)
    with pytest.raises(StyleInputsError, match="style_masks has 1 images for 2 styles"):
        engine.stylize(tubingen, [starry, shipwreck], params, style_masks=[left], network=net)
    with pytest.raises(ImageError, match="aspect ratio"):
        engine.stylize(tubingen, [starry, shipwreck], params, style_masks=[left.resize((40, 40)), right], network=net)
    with pytest.raises(ImageError, match="all black"):
        engine.stylize(tubingen, [starry, shipwreck], params, style_masks=[Image.new("RGB", tubingen.size), right], network=net)
    with pytest.raises(StyleInputsError, match="style_masks names mask images, but none were loaded"):
        engine.stylize(tubingen, [starry, shipwreck], params.with_overrides(style_masks="a|b"), network=net)


# --- snapshots ----------------------------------------------------------------------------------


def test_save_every_keeps_snapshots_of_the_image_as_it_forms(tubingen, starry, net):
    params = StyleParams(size=32, iterations=10, weights=WEIGHTS, device="cpu", tolerance=0, save_every=3, init="noise")
    result = engine.stylize(tubingen, starry, params, network=net)
    assert [i for i, _ in result.snapshots] == [3, 6, 9]
    assert all(image.size == (32, 24) for _, image in result.snapshots)
    first, last = (images.to_tensor(result.snapshots[k][1]) for k in (0, -1))
    assert float((last - result.image).abs().mean()) < float((first - result.image).abs().mean())  # converging
    # not part of the item's identity, and with luminance they show the colour output
    assert params.identity() == params.with_overrides(save_every=0).identity()
    lum = engine.stylize(tubingen, starry, params.with_overrides(color="luminance", iterations=3), network=net)
    assert lum.snapshots[-1][0] == 3 and np.array_equal(np.asarray(lum.snapshots[-1][1]), np.asarray(lum.to_pil()))


def test_cli_writes_snapshots_beside_the_output(tmp_path, tubingen, capsys):
    from nst_cli.main import main

    out = tmp_path / "out.png"
    style = f"{sample_image('starry_night.jpg')}|{sample_image('shipwreck.jpg')}"
    argv = ["stylize", str(sample_image("tubingen.jpg")), style, "-o", str(out), "--size", "32", "--iterations", "4",
            "--weights", WEIGHTS, "--device", "cpu", "-q", "--save-every", "2", "--style-blend-weights", "2|1", "--tolerance", "0"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.loss.csv", "out.loss.png", "out.png", "out.snap-00002.png", "out.snap-00004.png"]
    assert "2 snapshots" in capsys.readouterr().out


def test_task_path_hashes_every_style_and_mask_and_stores_snapshots(tmp_path, tubingen, starry, shipwreck, capsys):
    from nst_run.execute import _fetch_images, _job, _store
    from nst_run.planning import resolve_items

    left, right = half_masks(tubingen)
    left.save(tmp_path / "left.png")
    right.save(tmp_path / "right.png")
    (tmp_path / "right-copy.png").write_bytes((tmp_path / "right.png").read_bytes())
    a, b = sample_image("starry_night.jpg"), sample_image("shipwreck.jpg")
    rows = [
        ["c", f"{a}|{b}", "left.png|right.png", "2"],
        ["c", f"{a}|{b}", "left.png|right-copy.png", ""],  # same bytes, another URI, save_every blank
        ["c", f"{a}|{b}", "right.png|left.png", "2"],  # masks swapped
        ["c", f"{a}", "", "2"],
    ]
    csv = "content_uri,style_uri,style_masks,save_every\n" + "\n".join(",".join(r) for r in rows)
    csv = csv.replace("c,", f"{sample_image('tubingen.jpg')},")
    defaults = StyleParams(size=32, iterations=4, weights=WEIGHTS, device="cpu", tolerance=0)
    manifest = parse_manifest(csv.encode(), defaults=defaults, base_dir=str(tmp_path))
    assert not manifest.invalid, manifest.invalid
    assert list(manifest.rows[0].input_uris()) == ["content", "style", "style_1", "style_mask", "style_mask_1"]
    works = resolve_items(manifest.rows, str(tmp_path / "out"), force=False)
    assert works[0].item_id == works[1].item_id  # masks enter by their bytes; save_every does not enter
    assert len({works[0].item_id, works[2].item_id, works[3].item_id}) == 3
    work = works[0]
    assert set(work.input_sha256) == {"content", "style", "style_1", "style_mask", "style_mask_1"}
    job = _job(work, _fetch_images(work))
    assert len(job.styles) == 2 and len(job.style_masks) == 2
    (result,) = engine.stylize_batch([job])
    _store(work, str(tmp_path / "out"), result)
    folder = tmp_path / "out" / "items" / work.item_id
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["snapshots"] == ["snapshots/iter-00002.png", "snapshots/iter-00004.png"]
    for name in meta["snapshots"]:
        assert Image.open(io.BytesIO((folder / name).read_bytes())).size == (32, 24)
    assert meta["inputs"]["style_mask_1"]["uri"].endswith("right.png")
    assert meta["params"]["style_masks"] == [str(tmp_path / "left.png"), str(tmp_path / "right.png")]
    assert meta["row"]["style_uri"] == f"{a}|{b}"


# --- identity and validation ---------------------------------------------------------------------


def test_identity_of_the_controls():
    base = StyleParams()
    assert not {"style_blend_weights", "style_masks", "color", "normalize_network", "save_every"} & set(base.identity())
    assert StyleParams(style_blend_weights="2|2").identity() == base.identity()  # equal weights are the default
    assert StyleParams(style_blend_weights="3|1").identity()["style_blend_weights"] == [0.75, 0.25]
    assert StyleParams(style_blend_weights="6|2").identity() == StyleParams(style_blend_weights="3|1").identity()
    assert StyleParams(style_masks="s3://b/x.png|y.png").identity()["style_masks"] == 2  # bytes enter as inputs
    assert StyleParams(color="luminance").identity()["color"] == "luminance"
    assert StyleParams(normalize_network=True).identity()["normalize_network"] is True
    sha = {"content": "0" * 64, "style": "1" * 64}
    assert items.item_id(sha, base, WEIGHTS) != items.item_id({**sha, "style_1": "2" * 64}, base, WEIGHTS)


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"style_blend_weights": "1|-1"}, "style_blend_weights", "finite and >= 0"),
        ({"style_blend_weights": "0|0"}, "style_blend_weights", "must not all be 0"),
        ({"style_blend_weights": "1|x"}, "style_blend_weights", "valid number"),
        ({"color": "sepia"}, "color", "'none', 'luminance' or 'histogram'"),
        ({"save_every": -1}, "save_every", "greater than or equal to 0"),
        ({"style_masks": "a.png||b.png"}, "style_masks", "a style mask is empty"),
        ({"normalize_network": "maybe"}, "normalize_network", "valid boolean"),
    ],
)
def test_invalid_controls_are_refused_naming_the_field(values, field, message):
    with pytest.raises(ValidationError) as info:
        StyleParams(**values)
    (error,) = info.value.errors()
    assert error["loc"][0] == field and message in error["msg"], error


def test_counts_must_match_the_styles():
    params = StyleParams(style_blend_weights="1|2|3", style_masks="a|b")
    with pytest.raises(StyleInputsError, match="style_blend_weights has 3 values for 2 styles") as info:
        params.check_styles(2)
    assert info.value.field == "style_blend_weights"
    with pytest.raises(StyleInputsError, match="style_masks has 2 values for 3 styles") as info:
        params.check_styles(3)
    assert info.value.field == "style_masks"
    with pytest.raises(StyleInputsError, match="1 to 8"):
        StyleParams().check_styles(9)


def test_manifest_rows_with_bad_controls_are_invalid_with_the_column_named(tmp_path):
    header = "id,content_uri,style_uri,style_blend_weights,style_masks,color\n"
    rows = [
        "ok,c.jpg,a.jpg|b.jpg,1|3,ma.png|mb.png,luminance",
        "weights,c.jpg,a.jpg|b.jpg,1|2|3,,",
        "masks,c.jpg,a.jpg|b.jpg,,ma.png,",
        "negative,c.jpg,a.jpg|b.jpg,1|-2,,",
        "mode,c.jpg,a.jpg,,,sepia",
        "empty-style,c.jpg,a.jpg||b.jpg,,,",
        "remote-mask,c.jpg,s3://bucket/a.jpg,,http://x/m.png,",
        "content-list,c.jpg|d.jpg,a.jpg,,,",
    ]
    manifest = parse_manifest((header + "\n".join(rows)).encode(), base_dir=str(tmp_path))
    assert [r.id for r in manifest.rows] == ["ok"]
    assert manifest.rows[0].style_uris == (str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"))
    bad = {r.id: (r.column, r.reason) for r in manifest.invalid}
    assert bad["weights"] == ("style_blend_weights", "style_blend_weights has 3 values for 2 styles (one per style, '|'-separated)")
    assert bad["masks"][0] == "style_masks" and "1 values for 2 styles" in bad["masks"][1]
    assert bad["negative"][0] == "style_blend_weights"
    assert bad["mode"][0] == "color"
    assert bad["empty-style"][0] == "style_uri" and "style 2 of 3" in bad["empty-style"][1]
    assert bad["remote-mask"][0] == "style_masks"
    assert bad["content-list"][0] == "content_uri"


def test_cli_refuses_bad_counts_naming_the_flag(tmp_path, capsys):
    from nst_cli.main import main

    a, b = sample_image("starry_night.jpg"), sample_image("shipwreck.jpg")
    argv = ["stylize", str(sample_image("tubingen.jpg")), f"{a}|{b}", "-o", str(tmp_path / "o.png"), "--weights", WEIGHTS]
    assert main([*argv, "--style-blend-weights", "1"]) == 2
    assert "nst: error: --style-blend-weights: has 1 values for 2 styles" in capsys.readouterr().err
    assert main([*argv, "--color", "sepia"]) == 2
    assert "--color:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
