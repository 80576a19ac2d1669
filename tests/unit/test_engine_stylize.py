"""The optimisation end to end, with the real VGG-19 architecture (seeded random
weights) and the real sample images:

* content reconstruction from white noise (the paper's Figure 1 trend),
* stylising tubingen.jpg with starry_night.jpg (style loss and the quality
  criterion, judged by a VGG-19 with other random weights),
* batched optimisation equals one item at a time (float32: within stated
  tolerances over few iterations; float64: to the last bits),
* the divergence guard of the fixed-step L-BFGS, per item,
* determinism on the CPU.

Expensive results are computed once per module.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_quality_criterion, psnr, sample_image, stacked_targets

from nst_core import IterationInfo, engine, images, quality, stylize
from nst_core.network import Network, native_bf16, resolve_precision
from nst_core.params import DEFAULT_STYLE_LAYERS, StyleParams

WEIGHTS = "random:0"


# --- content reconstruction (Figure 1) --------------------------------------------------------

RECON_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
RECON_SIZE, RECON_ITERATIONS = 64, 200


@pytest.fixture(scope="module")
def reconstructions(tubingen, net) -> dict[str, float]:
    """PSNR (dB) of tubingen.jpg at 64 px reconstructed from white noise by content alone, per layer."""
    target = images.resized_tensor(tubingen, long_side=RECON_SIZE)
    out = {}
    for layer in RECON_LAYERS:
        params = StyleParams(
            size=RECON_SIZE, iterations=RECON_ITERATIONS, weights=WEIGHTS, device="cpu",
            content_layers=[layer], style_layers=[], style_weight=0, init="noise", seed=0,
            tolerance=0,  # all 200 iterations, no early stop
        )
        result = stylize(tubingen, tubingen, params, network=net)
        assert result.history[-1]["content"] < result.history[0]["content"]
        out[layer] = psnr(result.image, target)
    return out


def test_content_reconstruction_from_relu1_1_is_near_exact(reconstructions):
    assert reconstructions["relu1_1"] >= 30.0, reconstructions


def test_content_reconstruction_from_relu2_1(reconstructions):
    assert reconstructions["relu2_1"] >= 25.0, reconstructions


def test_content_reconstruction_gets_worse_with_depth(reconstructions, tubingen):
    values = [reconstructions[layer] for layer in RECON_LAYERS]
    assert values == sorted(values, reverse=True), reconstructions
    assert values[0] - values[-1] >= 10.0, reconstructions  # a real fall, not noise
    # the start (white noise) is far worse than any of them
    noise = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    target = images.resized_tensor(tubingen, long_side=RECON_SIZE)
    assert psnr(noise, target) < min(values)


# --- stylising -----------------------------------------------------------------------------------


def _stylised(size: int, precision: str, tubingen, starry, net):
    params = StyleParams(size=size, weights=WEIGHTS, device="cpu", precision=precision)  # defaults otherwise: <= 300 iterations, init=content
    return stylize(tubingen, starry, params, network=net)


@pytest.fixture(scope="module")
def styled(tubingen, starry, net):
    """``styled(size, precision)``: tubingen x starry_night at default parameters, each run once per module."""
    runs = {}

    def get(size: int, precision: str = "auto"):
        key = (size, resolve_precision(precision, torch.device("cpu")))
        if key not in runs:
            runs[key] = _stylised(size, key[1], tubingen, starry, net)
        return runs[key]

    return get


@pytest.fixture(scope="module")
def styled_128(styled):
    return styled(128)


def test_stylising_at_128_px_lowers_the_style_loss_tenfold(styled_128):
    first, last = styled_128.history[0], styled_128.history[-1]
    assert first["content"] == 0.0  # started from the content image
    assert first["style"] / last["style"] >= 10.0, (first["style"], last["style"])
    assert last["total"] < first["total"]


def test_result_carries_what_the_run_did(styled_128):
    r = styled_128
    assert r.image.shape == (3, 96, 128) and r.image.dtype == torch.float32 and r.image.device.type == "cpu"
    assert 0.0 <= float(r.image.min()) and float(r.image.max()) <= 1.0
    # at most the 300 default iterations; fewer only when the default early stopping said so
    assert r.iterations == len(r.history) <= 300
    assert r.stop_reason == "iterations" if r.iterations == 300 else r.stop_reason.startswith("converged")
    assert [row["iteration"] for row in r.history] == list(range(1, r.iterations + 1))
    assert list(r.history[0]) == ["iteration", "total", "content", "style", "tv", *[f"style:{n}" for n in DEFAULT_STYLE_LAYERS]]
    assert r.device == "cpu" and r.weights_id == WEIGHTS and r.wall_time_s > 0
    assert r.params.size == 128 and r.params.iterations == 300 and r.params.init == "content"
    w = r.params.layer_weights
    for row in (r.history[0], r.history[-1]):
        style = sum(w[n] * row[f"style:{n}"] for n in DEFAULT_STYLE_LAYERS)
        assert row["style"] == pytest.approx(style, rel=1e-5)
        total = r.params.content_weight * row["content"] + r.params.style_weight * row["style"]
        assert row["total"] == pytest.approx(total, rel=1e-5)
    assert r.to_pil().size == (128, 96)


# On a CPU without bf16 instructions (AVX2 only, say) PyTorch emulates bf16: measured 14x slower than
# fp32 there (10 s an iteration at 128 px on one thread), so a default run of 300 iterations at 128 px
# takes most of an hour and one at 64 px 5 minutes (314 s measured). ``auto`` never picks bf16 on such a
# CPU; there the bf16 path is covered by the short runs of test_engine_execution.py and the features test below.
NEEDS_NATIVE_BF16 = pytest.mark.skipif(
    not native_bf16(torch.device("cpu")), reason="bf16 is emulated on this CPU (no AVX512-BF16/AMX): 14x slower than fp32, minutes per run"
)


@pytest.mark.parametrize(
    ("size", "precision"), [(64, "fp32"), pytest.param(64, "bf16", marks=NEEDS_NATIVE_BF16), (128, "fp32"), pytest.param(128, "bf16", marks=NEEDS_NATIVE_BF16)]
)
def test_quality_criterion_holds(styled, size, precision, tubingen, starry):
    """Judged by a VGG-19 with other random weights: the Gram-matrix style distance
    to the painting falls >= 5x from the photo to the output, and the output's
    relu4_2 content distance to the photo stays below the painting's."""
    result = styled(size, precision)
    assert result.precision == precision
    assert_quality_criterion(result.image, tubingen, starry, size, result.weights_id)


# How far bf16's judged distances may sit from fp32's: the optimisation's own spread, measured, not one
# pair's luck. benchmarks/precision_spread.py over the 4 sample pairs x 2 weight seeds at 128 px on the CI
# CPU (benchmarks/results/precision-spread-cpu-128.json): bf16/fp32 style distance 0.929-1.076, content
# distance 0.998-1.058 (largest deviations 7.6 % and 5.8 %); the same pair once measured 1.092 on another
# run of that CPU. Both precisions also meet the quality criterion on their own (test above). The bound is
# 1.6x the largest deviation seen: a bf16 path that broke the optimisation lands far outside it.
BF16_SPREAD = 0.15


@NEEDS_NATIVE_BF16
def test_bf16_matches_fp32_in_judged_quality(styled, tubingen, starry):
    """bf16 convolutions (precision=bf16, what ``auto`` picks on bf16 hardware) are a different
    computation, not a worse result: at 128 px both judged distances within the measured spread."""
    fp32, bf16 = styled(128, "fp32"), styled(128, "bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert not torch.equal(fp32.image, bf16.image)  # bf16 really ran
    photo = images.resized_tensor(tubingen, long_side=128)
    style = images.resized_tensor(starry, long_side=128)
    q32, q16 = (quality.measure(r.image, photo, style, r.weights_id) for r in (fp32, bf16))
    assert abs(q16.style_distance / q32.style_distance - 1) <= BF16_SPREAD, (q16, q32)
    assert abs(q16.content_distance / q32.content_distance - 1) <= BF16_SPREAD, (q16, q32)


def test_bf16_features_are_bf16_tensors_close_to_the_fp32_ones(net, net64, tubingen):
    x = images.resized_tensor(tubingen, long_side=64).unsqueeze(0)
    layers = ["relu1_1", "relu3_1", "relu5_1"]
    plain = engine.features(net.at_precision("fp32"), x, layers)
    half = engine.features(net.at_precision("bf16"), x, layers)
    for name in layers:
        assert half[name].dtype == torch.bfloat16  # as computed: the losses widen them (nst_core.losses)
        error = float((half[name] - plain[name]).norm() / plain[name].norm())
        assert 0.0 < error < 0.05, (name, error)
    # float64 is never cast: the exactness tests run as given
    assert engine.features(net64.at_precision("bf16"), x.double(), ["relu1_1"])["relu1_1"].dtype == torch.float64


def test_style_targets_are_cached_per_precision(net, starry):
    cache = engine.StyleTargetCache()
    style = images.resized_tensor(starry, long_side=64)
    for precision in ("fp32", "bf16", "fp32", "bf16"):
        cache.get(net.at_precision(precision), style, DEFAULT_STYLE_LAYERS)
    assert (cache.misses, cache.hits) == (2, 2)


# --- callbacks, init ---------------------------------------------------------------------------


def test_callback_every_n_iterations_and_at_the_end(tubingen, starry, net):
    seen: list[IterationInfo] = []
    params = StyleParams(size=32, iterations=7, progress_every=3, weights=WEIGHTS, device="cpu")
    result = stylize(tubingen, starry, params, network=net, callback=seen.append)
    assert [info.iteration for info in seen] == [3, 6, 7]
    assert all(info.iterations == 7 and info.elapsed_s >= 0 for info in seen)
    assert seen[-1].image.shape == (1, 3, 24, 32)
    assert seen[-1].losses[0]["total"] == pytest.approx(result.history[-1]["total"])
    assert set(seen[0].losses[0]) == set(result.history[0]) - {"iteration"}


def test_init_style_and_init_image(tubingen, starry):
    params = StyleParams(size=32, init="style", weights=WEIGHTS)
    content, style, init = engine.prepare_images(params, tubingen, starry)
    assert content.shape == init.shape == (3, 24, 32) and style.shape == (3, 20, 32)
    torch.testing.assert_close(init, images.resized_tensor(starry, exact=(32, 24)), rtol=0, atol=0)
    params = StyleParams(size=32, init="some/start.png", weights=WEIGHTS)
    _, _, init = engine.prepare_images(params, tubingen, starry, init_image=starry)
    torch.testing.assert_close(init, images.resized_tensor(starry, exact=(32, 24)), rtol=0, atol=0)
    content, style, init = engine.prepare_images(StyleParams(size=32, style_scale=2.0), tubingen, starry)
    assert style.shape == (3, 40, 64) and torch.equal(init, content)


def test_job_names_name_the_images_in_errors(tubingen, starry):
    from PIL import Image

    from nst_core.errors import ImageError

    strip = tubingen.resize((40, 10))
    params = StyleParams(size=40, weights=WEIGHTS)
    with pytest.raises(ImageError, match=r"^content image \(after resizing to 40 px\): 40x10 px is too small"):
        engine.stage_inputs(engine.Job(strip, starry, params))  # positional, no names: the kind alone
    job = engine.Job(strip, starry, params, None, None, {"content": "s3://bucket/strip.png"})
    with pytest.raises(ImageError, match=r"^content image s3://bucket/strip.png \(after resizing to 40 px\)"):
        engine.stage_inputs(job)
    with pytest.raises(ImageError, match=r"^style image 2 b.jpg \(after resizing to 40 px"):
        engine.stage_inputs(engine.Job(tubingen, [starry, strip], params, names={"style_1": "b.jpg"}))
    masked = StyleParams(size=32, weights=WEIGHTS, style_masks="a.png|b.png")
    masks = [Image.new("RGB", tubingen.size, "white"), Image.new("RGB", (10, 40), "white")]
    with pytest.raises(ImageError, match=r"^style mask 2 masks/b.png: aspect ratio 10x40"):
        engine.stage_inputs(engine.Job(tubingen, [starry, starry], masked, None, masks, {"style_mask_1": "masks/b.png"}))


# --- batching ----------------------------------------------------------------------------------
#
# A batch is B independent problems: per-item losses and gradients, and optimisers whose
# state (L-BFGS history, scaling, first step; Adam moments) is per item. Checked in three
# steps, because bit-equality of a whole run cannot be had: float32 convolutions of a batch
# of 2 differ from batch-of-1 ones in the last bits (~1e-7 relative), and this fixed-step
# L-BFGS amplifies such noise quickly (measured: perturbing the start by 1e-7 changes the
# loss by ~0.7 % after 5 iterations from noise, ~0.2 % from the content image).
#
# 1. the optimisers alone, on a smooth problem with very different items: batch == alone to 1e-6
#    (measured: bit-identical); a shared first step, shared curvature scaling or shared rho
#    give differences of 1e-4 to 1.
# 2. the network + loss: per-item loss terms and gradients in a batch equal those alone.
# 3. end to end, over the few iterations before float noise is amplified: every iteration's
#    total loss within 0.2 % of the lone run's, mean pixel difference <= 2e-3 (measured:
#    at most 0.063 % and 5.5e-4, for the noise-initialised item under L-BFGS; at 8 L-BFGS
#    iterations that item already differs by ~1 %, which is why L-BFGS is checked over 4).

BATCH_ITERATIONS = {"lbfgs": 4, "adam": 8}


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_optimisers_treat_batch_items_independently(optimizer):
    from nst_core.optim import make_optimizer

    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 8, 8, generator=g) * 0.8 + 0.1
    curvature = torch.rand(3, 3, 8, 8, generator=g) + 0.1
    curvature[1] *= 100.0  # items on very different scales
    curvature[2] *= 0.01
    start = torch.rand(3, 3, 8, 8, generator=g)
    lr = StyleParams(optimizer=optimizer).effective_lr

    def run(items: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = start[items].clone().requires_grad_(True)
        opt = make_optimizer(optimizer, x, lr)
        losses = []
        for i in range(12):
            loss = (curvature[items] * (x - target[items]).square()).flatten(1).sum(1)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            losses.append(loss.detach())
            if i < 11:
                opt.step(x, grad)
        return x.detach(), losses

    together, batch_losses = run(slice(0, 3))
    assert batch_losses[-1].sum() < 0.5 * batch_losses[0].sum()  # it does optimise
    for i in range(3):
        alone, alone_losses = run(slice(i, i + 1))
        torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.stack([b[i] for b in batch_losses]), torch.stack([a[0] for a in alone_losses]), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def two_items(tubingen, starry):
    """Two different (content, style) pairs of the same size, 64x48."""
    c1 = images.resized_tensor(tubingen, exact=(64, 48))
    c2 = images.resized_tensor(images.load_image(sample_image("shipwreck.jpg")), exact=(64, 48))
    s1 = images.resized_tensor(starry, long_side=64)
    s2 = images.resized_tensor(images.load_image(sample_image("hoovertowernight.jpg")), long_side=64)
    return (c1, s1), (c2, s2)


def _loss_and_grad(net, params, x, content, style):
    from nst_core.losses import GatysLoss

    x = x.clone().requires_grad_(True)
    loss_fn = GatysLoss(engine.loss_weights(params), content, style)
    total, terms = loss_fn(net.features(x, loss_fn.weights.layers), x)
    (grad,) = torch.autograd.grad(total.sum(), x)
    return {k: v.detach() for k, v in terms.items()}, grad


def test_batched_losses_and_gradients_equal_each_item_alone(net, two_items):
    params = StyleParams(size=64, weights=WEIGHTS, device="cpu", tv_weight=0.1)
    (c1, s1), (c2, s2) = two_items
    start = torch.stack([c2, c1])  # each item starts from the other's content: every term non-zero
    content, style = stacked_targets(net, params, [c1, c2], [s1, s2])
    terms, grad = _loss_and_grad(net, params, start, content, style)
    for i, (c, s) in enumerate(((c1, s1), (c2, s2))):
        content1, style1 = stacked_targets(net, params, [c], [s])
        terms1, grad1 = _loss_and_grad(net, params, start[i : i + 1], content1, style1)
        for name, value in terms1.items():
            assert float(value[0]) > 0, name
            assert float(terms[name][i]) == pytest.approx(float(value[0]), rel=1e-5), (i, name)
        torch.testing.assert_close(grad[i], grad1[0], rtol=1e-4, atol=1e-5 * float(grad1.abs().max()))


def _assert_same_run(batch_hist, alone_hist, batch_image, alone_image, item) -> None:
    assert len(batch_hist) == len(alone_hist)
    assert batch_hist[0]["total"] == pytest.approx(alone_hist[0]["total"], rel=1e-5)
    for b_row, a_row in zip(batch_hist, alone_hist):
        assert b_row["total"] == pytest.approx(a_row["total"], rel=2e-3), (item, b_row["iteration"])
    mean_diff = float((batch_image - alone_image).abs().mean())
    assert mean_diff <= 2e-3, (item, mean_diff)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_a_batch_equals_each_item_alone(net, two_items, optimizer):
    params = StyleParams(size=64, iterations=BATCH_ITERATIONS[optimizer], optimizer=optimizer, weights=WEIGHTS, device="cpu")
    (c1, s1), (c2, s2) = two_items
    content, style = stacked_targets(net, params, [c1, c2], [s1, s2])
    batch = engine.optimise(net, params, torch.stack([c1, c2]), content, style)
    assert batch.images.shape == (2, 3, 48, 64)
    for i, (c, s) in enumerate(((c1, s1), (c2, s2))):
        content1, style1 = stacked_targets(net, params, [c], [s])
        alone = engine.optimise(net, params, c.unsqueeze(0), content1, style1)
        assert len(alone.histories[0]) == params.iterations
        _assert_same_run(batch.histories[i], alone.histories[0], batch.images[i], alone.images[0], i)
    # and the two items really are different problems
    assert abs(batch.histories[0][-1]["total"] - batch.histories[1][-1]["total"]) > 0.1 * batch.histories[0][-1]["total"]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_stylize_batch_equals_stylize_alone(net, tubingen, starry, optimizer):
    """The public batch entry point: two jobs (other content, other seed and init) in one optimisation."""
    shipwreck = images.load_image(sample_image("shipwreck.jpg")).resize(tubingen.size)
    params = StyleParams(size=64, iterations=BATCH_ITERATIONS[optimizer], optimizer=optimizer, weights=WEIGHTS, device="cpu")
    jobs = [
        engine.Job(tubingen, starry, params),
        engine.Job(shipwreck, starry, params.with_overrides(init="noise", seed=3)),
    ]
    together = engine.stylize_batch(jobs, network=net)
    for i, job in enumerate(jobs):
        alone = stylize(job.content, job.style, job.params, network=net)
        assert together[i].params == job.params and together[i].extra.get("batch_size") == 2
        _assert_same_run(together[i].history, alone.history, together[i].image, alone.image, i)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_parameters_bit_identical_on_cpu(tubingen, starry, net):
    params = StyleParams(size=48, iterations=12, init="noise", seed=5, weights=WEIGHTS, device="cpu")
    a = stylize(tubingen, starry, params, network=net)
    b = stylize(tubingen, starry, params, network=net)
    assert torch.equal(a.image, b.image)
    assert a.history == b.history
    c = stylize(tubingen, starry, params.with_overrides(seed=6), network=net)
    assert not torch.equal(a.image, c.image)
    assert (a.image - c.image).abs().mean() > 1e-3


def test_early_stopping_stops_where_stop_iteration_reads_it_off_the_full_run(tubingen, starry, net):
    """On the CPU a lone item's early-stopped run is the start of its run without early stopping, and
    ``engine.stop_iteration`` on that run's totals says where it stops (benchmarks/multiscale.py sweeps
    tolerances this way, off one full run per pair)."""
    base = dict(size=32, iterations=60, weights=WEIGHTS, device="cpu")
    full = stylize(tubingen, starry, StyleParams(**base, tolerance=0), network=net)
    totals = [row["total"] for row in full.history]
    stops = []
    for tolerance in (0.01, 0.05):
        stopped = stylize(tubingen, starry, StyleParams(**base, tolerance=tolerance), network=net)
        assert stopped.iterations == engine.stop_iteration(totals, tolerance), tolerance
        assert [row["total"] for row in stopped.history] == totals[: stopped.iterations]
        stops.append(stopped.iterations)
    assert min(stops) < 60, stops  # the rule did stop a run early
    assert engine.stop_iteration(totals, 0.0) == 60


def test_adam_counts_iterations_like_lbfgs(tubingen, starry, net):
    params = StyleParams(size=32, iterations=5, optimizer="adam", weights=WEIGHTS, device="cpu")
    result = stylize(tubingen, starry, params, network=net)
    assert result.iterations == 5 and [r["iteration"] for r in result.history] == [1, 2, 3, 4, 5]
    assert result.history[-1]["style"] < result.history[0]["style"]
    assert params.effective_lr == 0.02


# --- the divergence guard ------------------------------------------------------------------------
#
# The fixed-step L-BFGS can diverge (seen: color=histogram at 224 px, total loss 1.8 -> 340 in one
# step, then ~2000-3000 to the end). A step of 3 instead of 1 makes it happen cheaply, at 32 px
# within 10 iterations (measured: the total loss goes 522 -> 232 -> 540 at iteration 6 and ends
# near 1.5e4 without the guard; with it, the guard fires at 6 and 9 and the loss ends at 155).

# fp32: the guard tests compare stylize() with engine.optimise() on the fp32 network and recompute losses in fp32
GUARD = dict(size=32, iterations=16, lr=3.0, tolerance=0, weights=WEIGHTS, device="cpu", precision="fp32")


def test_lbfgs_reset_touches_only_the_items_it_names():
    """BatchedLBFGS.reset on one item of three: the others run bit for bit as without it."""
    from nst_core.optim import BatchedLBFGS

    g = torch.Generator().manual_seed(1)
    target = torch.rand(3, 3, 8, 8, generator=g)
    curvature = torch.rand(3, 3, 8, 8, generator=g) + 0.1
    start = torch.rand(3, 3, 8, 8, generator=g)

    def run(items: slice, reset_item: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = start[items].clone()
        opt = BatchedLBFGS(x.shape[0], lr=1.0, clamp=(0.0, 1.0))
        kept = None
        for i in range(12):
            grad = 2 * curvature[items] * (x - target[items])
            if i == 3:
                kept = x.clone()
            opt.step(x, grad)
            if i == 6 and reset_item is not None:  # what the guard does: put an earlier image back, reset
                mask = torch.zeros(x.shape[0], dtype=torch.bool)
                mask[reset_item] = True
                x[mask] = kept[mask]
                opt.reset(mask)
        return x, opt.step_scale

    plain, _ = run(slice(0, 3), None)
    reset, scale = run(slice(0, 3), 1)
    assert scale.tolist() == [1.0, 0.5, 1.0]
    assert torch.equal(reset[0], plain[0]) and torch.equal(reset[2], plain[2])  # untouched, bit for bit
    assert not torch.allclose(reset[1], plain[1], atol=1e-4)
    alone, _ = run(slice(1, 2), 0)  # the reset item alone, with the same reset
    torch.testing.assert_close(reset[1], alone[0], rtol=0, atol=1e-6)


def _guard_problem(net, tubingen, starry):
    params = StyleParams(**GUARD)
    content = images.resized_tensor(tubingen, long_side=32)
    targets = stacked_targets(net, params, [content], [images.resized_tensor(starry, long_side=32)])
    return params, content, targets


def test_divergence_guard_puts_back_the_best_image_and_halves_the_step(net, tubingen, starry):
    params, content, (content_t, style_t) = _guard_problem(net, tubingen, starry)
    unguarded = engine.optimise(net, params, content.unsqueeze(0), content_t, style_t, divergence_factor=None)
    off = [row["total"] for row in unguarded.histories[0]]
    assert unguarded.divergences == [[]]
    assert max(off) > 20 * min(off) and off[-1] > 10 * min(off), off  # it diverged and stayed so

    result = stylize(tubingen, starry, params, network=net)  # the same problem through the public entry point
    on = [row["total"] for row in result.history]
    fired = result.extra["divergences"]
    assert fired, on
    for i in fired:
        best = min(on[: i - 1])
        assert on[i - 1] > engine.DIVERGENCE_FACTOR * best  # it fired on a real rise...
        assert on[i] == pytest.approx(best, rel=1e-6)  # ...and the next evaluation is of the best image, put back
    assert all(v <= engine.DIVERGENCE_FACTOR * min(on[:k]) for k, v in enumerate(on) if k and k + 1 not in fired)
    assert min(on) < 0.8 * min(off) and on[-1] < 0.1 * off[-1], (on, off)
    # the returned image is the best one seen, and its losses are what the result reports
    assert result.image_iteration == result.extra["image_iteration"] == 1 + on.index(min(on))
    assert result.final_losses["total"] == min(on)
    terms, _ = _loss_and_grad(net, params, result.image.unsqueeze(0), content_t, style_t)
    assert float(terms["total"][0]) == pytest.approx(min(on), rel=1e-5)
    assert result.stop_reason == "iterations"


def test_without_a_rise_the_guard_changes_nothing(net, tubingen, starry):
    """At the default step this short run never rises 2x: guarded and unguarded runs are identical."""
    params = StyleParams(**{**GUARD, "lr": None, "iterations": 10})
    _, content, (content_t, style_t) = _guard_problem(net, tubingen, starry)
    guarded = engine.optimise(net, params, content.unsqueeze(0), content_t, style_t)
    unguarded = engine.optimise(net, params, content.unsqueeze(0), content_t, style_t, divergence_factor=None)
    assert guarded.divergences == [[]] and guarded.histories == unguarded.histories
    assert torch.equal(guarded.images, unguarded.images)


@pytest.fixture(scope="module")
def net64(net) -> Network:
    """The same VGG-19 in float64, where a batch's arithmetic per item is that of the item alone."""
    return Network(copy.deepcopy(net.features).double(), net.weights, net.weights_id, net.device)


def test_guard_and_best_image_are_per_item_in_a_batch_float64(net64, tubingen, starry):
    """Three items whose guard fires at different iterations (or never), together and alone, in float64:
    the same histories, guard firings and returned images, to the last bits (measured: identical)."""
    shipwreck, hoover = (images.load_image(sample_image(n)) for n in ("shipwreck.jpg", "hoovertowernight.jpg"))
    params = StyleParams(**{**GUARD, "lr": 2.0, "iterations": 10})
    c = {n: images.resized_tensor(im, exact=(32, 24)).double() for n, im in (("tub", tubingen), ("ship", shipwreck), ("hoover", hoover))}
    s = {n: images.resized_tensor(im, long_side=32).double() for n, im in (("starry", starry), ("hoover", hoover))}
    noise = torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    items = [(c["tub"], s["starry"], c["tub"]), (c["ship"], s["hoover"], noise), (c["hoover"], s["starry"], c["hoover"])]
    content, style = stacked_targets(net64, params, [i[0] for i in items], [i[1] for i in items])
    batch = engine.optimise(net64, params, torch.stack([i[2] for i in items]), content, style, dtype=torch.float64)
    assert batch.images.dtype == torch.float64
    assert len({tuple(d) for d in batch.divergences}) == 3 and [] in batch.divergences, batch.divergences
    for b, (c_b, s_b, init) in enumerate(items):
        content1, style1 = stacked_targets(net64, params, [c_b], [s_b])
        alone = engine.optimise(net64, params, init.unsqueeze(0), content1, style1, dtype=torch.float64)
        assert batch.divergences[b] == alone.divergences[0] and batch.image_iterations[b] == alone.image_iterations[0]
        for row_b, row_a in zip(batch.histories[b], alone.histories[0], strict=True):
            assert row_b["total"] == pytest.approx(row_a["total"], rel=1e-12, abs=0), (b, row_a["iteration"])
        torch.testing.assert_close(batch.images[b], alone.images[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_a_stopped_item_leaves_the_batch_and_the_others_go_on_as_alone_float64(net64, tubingen, starry, monkeypatch, optimizer):
    """Three items that stop early at different iterations, in float64: the batch shrinks as each stops
    (its forward passes hold only the items still running), and every item's history, stop, returned
    image and last snapshot equal its run alone, to the last bits."""
    shipwreck, hoover = (images.load_image(sample_image(n)) for n in ("shipwreck.jpg", "hoovertowernight.jpg"))
    lr, tolerance = {"lbfgs": (1.0, 0.02), "adam": (0.02, 0.05)}[optimizer]
    params = StyleParams(**{**GUARD, "lr": lr, "iterations": 80, "tolerance": tolerance, "optimizer": optimizer})
    c = {n: images.resized_tensor(im, exact=(32, 24)).double() for n, im in (("tub", tubingen), ("ship", shipwreck), ("hoover", hoover))}
    s = {n: images.resized_tensor(im, long_side=32).double() for n, im in (("starry", starry), ("hoover", hoover))}
    items = [(c["tub"], s["starry"]), (c["ship"], s["hoover"]), (c["hoover"], s["starry"])]
    batch_sizes: list[int] = []
    real_features = engine.features

    def counting(network, x, *args, **kwargs):
        batch_sizes.append(x.shape[0])
        return real_features(network, x, *args, **kwargs)

    def last_images(kept: dict[int, torch.Tensor]):
        def take(iteration: int, x: torch.Tensor) -> None:
            for b in range(x.shape[0]):
                kept[b] = x[b].clone()

        return take

    content, style = stacked_targets(net64, params, [i[0] for i in items], [i[1] for i in items])
    monkeypatch.setattr(engine, "features", counting)
    seen: dict[int, torch.Tensor] = {}
    batch = engine.optimise(net64, params, torch.stack([i[0] for i in items]), content, style, dtype=torch.float64, snapshot=last_images(seen))
    stops = batch.stop_iterations
    assert len(set(stops)) >= 2, stops  # the batch shrank at least once
    # per evaluation, the items that had not stopped before it
    assert batch_sizes == [sum(stop >= k for stop in stops) for k in range(1, max(stops) + 1)]
    monkeypatch.setattr(engine, "features", real_features)
    for b, (c_b, s_b) in enumerate(items):
        content1, style1 = stacked_targets(net64, params, [c_b], [s_b])
        alone_seen: dict[int, torch.Tensor] = {}
        alone = engine.optimise(net64, params, c_b.unsqueeze(0), content1, style1, dtype=torch.float64, snapshot=last_images(alone_seen))
        assert batch.stop_iterations[b] == alone.stop_iterations[0] and batch.stop_reasons[b] == alone.stop_reasons[0]
        assert batch.image_iterations[b] == alone.image_iterations[0]
        for row_b, row_a in zip(batch.histories[b], alone.histories[0], strict=True):
            assert row_b["total"] == pytest.approx(row_a["total"], rel=1e-12, abs=0), (b, row_a["iteration"])
        torch.testing.assert_close(batch.images[b], alone.images[0], rtol=0, atol=1e-12)
        # the image a stopped item is shown with after it stopped is the one it stopped with
        torch.testing.assert_close(seen[b], alone_seen[0], rtol=0, atol=1e-12)
