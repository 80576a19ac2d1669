"""The losses of Gatys et al. (2015): each checked against its formula written
out independently here (numpy, float64), its gradient checked numerically,
and its invariances checked (style ignores where a feature is, and is zero
for the style image itself through the real VGG-19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import sample_image

from nst_core import losses
from nst_core.losses import GatysLoss, LossWeights

NORMALIZATIONS = ("paper", "target")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _rand(*shape: int, seed: int, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.abs() if positive else x


# --- independent reference formulas (numpy, explicit loops over the batch) --------------


def ref_gram(f: np.ndarray) -> np.ndarray:
    """Raw Gram matrix G_ij = sum_k F_ik F_jk of one item's features [N, H, W]."""
    n = f.shape[0]
    flat = f.reshape(n, -1)
    g = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            g[i, j] = np.sum(flat[i] * flat[j])
    return g


def ref_content(f: np.ndarray, p: np.ndarray, norm: str) -> np.ndarray:
    out = []
    for b in range(f.shape[0]):
        pb = p[b] if p.shape[0] > 1 else p[0]
        err = np.sum((f[b] - pb) ** 2)
        out.append(0.5 * err if norm == "paper" else err / np.sum(pb**2))
    return np.array(out)


def ref_style_paper(f: np.ndarray, style_features: np.ndarray) -> np.ndarray:
    """E_l = sum (G - A)^2 / (4 N^2 M^2) with raw Grams of same-size images."""
    out = []
    for b in range(f.shape[0]):
        n, h, w = f[b].shape
        m = h * w
        g, a = ref_gram(f[b]), ref_gram(style_features[0])
        out.append(np.sum((g - a) ** 2) / (4.0 * n**2 * m**2))
    return np.array(out)


def ref_style_target(f: np.ndarray, style_features: np.ndarray) -> np.ndarray:
    """sum (G/M - A/M_s)^2 / sum (A/M_s)^2 (style image may have another size)."""
    out = []
    ms = style_features.shape[-2] * style_features.shape[-1]
    a = ref_gram(style_features[0]) / ms
    for b in range(f.shape[0]):
        m = f.shape[-2] * f.shape[-1]
        g = ref_gram(f[b]) / m
        out.append(np.sum((g - a) ** 2) / np.sum(a**2))
    return np.array(out)


def ref_tv(x: np.ndarray, norm: str) -> np.ndarray:
    out = []
    for b in range(x.shape[0]):
        c, h, w = x[b].shape
        total = 0.0
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    if i + 1 < h:
                        total += (x[b, ch, i + 1, j] - x[b, ch, i, j]) ** 2
                    if j + 1 < w:
                        total += (x[b, ch, i, j + 1] - x[b, ch, i, j]) ** 2
        out.append(total if norm == "paper" else total / (c * h * w))
    return np.array(out)


# --- each loss equals its formula -----------------------------------------------------------


def test_gram_matrix_is_raw_and_mean_gram_is_per_position():
    f = _rand(2, 4, 3, 5, seed=1)
    g = losses.gram_matrix(f)
    for b in range(2):
        np.testing.assert_allclose(_np(g[b]), ref_gram(_np(f[b])), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(_np(losses.mean_gram(f)[b]), ref_gram(_np(f[b])) / 15, rtol=1e-12, atol=1e-12)


def test_the_gram_gradient_comes_back_in_the_features_layout_and_equals_autograds():
    # Channels-last features (the layout the engine may choose): a gradient in the other layout would make
    # the network's backward add and mask tensors of two layouts, a slow strided pass per layer.
    f = _rand(2, 8, 5, 7, seed=4).requires_grad_(True)
    weight = _rand(2, 8, 8, seed=5)
    expected = torch.autograd.grad((torch.einsum("bnk,bmk->bnm", f.flatten(2), f.flatten(2)) * weight).sum(), f)[0]
    for layout in (torch.contiguous_format, torch.channels_last):
        x = f.detach().contiguous(memory_format=layout).requires_grad_(True)
        (grad,) = torch.autograd.grad((losses.gram_matrix(x) * weight).sum(), x)
        assert grad.is_contiguous(memory_format=layout)
        np.testing.assert_allclose(_np(grad), _np(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", NORMALIZATIONS)
@pytest.mark.parametrize("target_batch", [1, 3], ids=["shared-target", "per-item-target"])
def test_content_loss_equals_formula(norm, target_batch):
    f = _rand(3, 4, 5, 6, seed=2)
    p = _rand(target_batch, 4, 5, 6, seed=3)
    got = losses.content_loss(f, p, norm)
    assert got.shape == (3,)
    np.testing.assert_allclose(_np(got), ref_content(_np(f), _np(p), norm), rtol=1e-10)


def test_content_loss_paper_form_is_half_the_sum_of_squares():
    f = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    p = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64)
    assert losses.content_loss(f, p, "paper").item() == pytest.approx(0.5 * (1 + 9))
    assert losses.content_loss(f, p, "target").item() == pytest.approx(1.0)  # (1+9)/(1+9)


def test_style_loss_paper_form_equals_formula_with_raw_grams():
    f = _rand(2, 5, 4, 6, seed=4, positive=True)  # post-ReLU-like
    s = _rand(1, 5, 4, 6, seed=5, positive=True)  # same size as the generated image
    got = losses.style_layer_loss(f, losses.mean_gram(s), "paper")
    assert got.shape == (2,)
    np.testing.assert_allclose(_np(got), ref_style_paper(_np(f), _np(s)), rtol=1e-10)


@pytest.mark.parametrize("style_hw", [(4, 6), (7, 3)], ids=["same-size", "other-size"])
def test_style_loss_target_form_equals_formula(style_hw):
    f = _rand(2, 5, 4, 6, seed=6, positive=True)
    s = _rand(1, 5, *style_hw, seed=7, positive=True)
    got = losses.style_layer_loss(f, losses.mean_gram(s), "target")
    np.testing.assert_allclose(_np(got), ref_style_target(_np(f), _np(s)), rtol=1e-10)


def test_style_loss_per_item_targets():
    f = _rand(2, 3, 4, 4, seed=8, positive=True)
    s = _rand(2, 3, 4, 4, seed=9, positive=True)
    got = losses.style_layer_loss(f, losses.mean_gram(s), "paper")
    want = [ref_style_paper(_np(f[b : b + 1]), _np(s[b : b + 1]))[0] for b in range(2)]
    np.testing.assert_allclose(_np(got), want, rtol=1e-10)


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_tv_loss_equals_formula(norm):
    x = _rand(2, 3, 5, 7, seed=10)
    got = losses.tv_loss(x, norm)
    np.testing.assert_allclose(_np(got), ref_tv(_np(x), norm), rtol=1e-10)


def test_tv_loss_zero_for_a_flat_image():
    assert losses.tv_loss(torch.full((1, 3, 8, 8), 0.3)).item() == 0.0


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_gatys_loss_total_and_named_terms(norm):
    """total = alpha*content + beta*sum_l w_l E_l + gamma*tv, every term reported unweighted."""
    image = _rand(2, 3, 8, 8, seed=11).clamp(0, 1)
    feats = {
        "relu1_1": _rand(2, 4, 8, 8, seed=12, positive=True),
        "relu2_1": _rand(2, 6, 4, 4, seed=13, positive=True),
        "relu4_2": _rand(2, 8, 2, 2, seed=14, positive=True),
    }
    content_t = {"relu4_2": _rand(1, 8, 2, 2, seed=15, positive=True)}
    style_src = {"relu1_1": _rand(1, 4, 8, 8, seed=16, positive=True), "relu2_1": _rand(1, 6, 4, 4, seed=17, positive=True)}
    style_t = {k: losses.mean_gram(v) for k, v in style_src.items()}
    w = LossWeights(
        content=0.7, style=13.0, tv=2.5, style_layers={"relu1_1": 0.25, "relu2_1": 0.75},
        content_layers=("relu4_2",), normalization=norm,
    )
    total, terms = GatysLoss(w, content_t, style_t)(feats, image)

    assert list(terms)[:5] == ["total", "content", "style", "tv", "style:relu1_1"]
    assert set(terms) == {"total", "content", "style", "tv", "style:relu1_1", "style:relu2_1"}
    ref_style = ref_style_paper if norm == "paper" else ref_style_target
    e1 = ref_style(_np(feats["relu1_1"]), _np(style_src["relu1_1"]))
    e2 = ref_style(_np(feats["relu2_1"]), _np(style_src["relu2_1"]))
    content = ref_content(_np(feats["relu4_2"]), _np(content_t["relu4_2"]), norm)
    tv = ref_tv(_np(image), norm)
    np.testing.assert_allclose(_np(terms["style:relu1_1"]), e1, rtol=1e-10)
    np.testing.assert_allclose(_np(terms["style:relu2_1"]), e2, rtol=1e-10)
    np.testing.assert_allclose(_np(terms["content"]), content, rtol=1e-10)
    np.testing.assert_allclose(_np(terms["style"]), 0.25 * e1 + 0.75 * e2, rtol=1e-10)
    np.testing.assert_allclose(_np(terms["tv"]), tv, rtol=1e-10)
    want_total = 0.7 * content + 13.0 * (0.25 * e1 + 0.75 * e2) + 2.5 * tv
    np.testing.assert_allclose(_np(total), want_total, rtol=1e-10)
    assert torch.equal(terms["total"], total)


def test_gatys_loss_averages_several_content_layers():
    """Current behaviour: with several content layers the content term is their mean."""
    image = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    feats = {"relu1_1": _rand(1, 2, 4, 4, seed=20), "relu2_1": _rand(1, 3, 2, 2, seed=21)}
    targets = {"relu1_1": _rand(1, 2, 4, 4, seed=22), "relu2_1": _rand(1, 3, 2, 2, seed=23)}
    w = LossWeights(content=1.0, style=0.0, tv=0.0, style_layers={}, content_layers=("relu1_1", "relu2_1"), normalization="paper")
    _, terms = GatysLoss(w, targets, {})(feats, image)
    per_layer = [ref_content(_np(feats[k]), _np(targets[k]), "paper")[0] for k in ("relu1_1", "relu2_1")]
    assert terms["content"].item() == pytest.approx(sum(per_layer) / 2, rel=1e-10)
    assert terms["tv"].item() == 0.0  # gamma = 0: tv not computed, reported as 0


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_gradcheck_content_loss(norm):
    f = _rand(2, 3, 3, 4, seed=30).requires_grad_(True)
    p = _rand(1, 3, 3, 4, seed=31)
    assert torch.autograd.gradcheck(lambda x: losses.content_loss(x, p, norm), (f,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_gradcheck_style_layer_loss(norm):
    f = _rand(2, 3, 3, 4, seed=32, positive=True).requires_grad_(True)
    a = losses.mean_gram(_rand(1, 3, 5, 2, seed=33, positive=True))
    assert torch.autograd.gradcheck(lambda x: losses.style_layer_loss(x, a, norm), (f,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_gradcheck_tv_loss(norm):
    x = _rand(2, 3, 4, 5, seed=34).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: losses.tv_loss(t, norm), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_gradcheck_gatys_loss_through_features(norm):
    """The composite loss differentiates correctly w.r.t. features and the image (tv)."""
    fa = _rand(1, 3, 4, 4, seed=35, positive=True).requires_grad_(True)
    img = _rand(1, 3, 4, 4, seed=36).requires_grad_(True)
    w = LossWeights(content=0.5, style=3.0, tv=0.2, style_layers={"relu1_1": 1.0}, content_layers=("relu1_1",), normalization=norm)
    loss = GatysLoss(w, {"relu1_1": _rand(1, 3, 4, 4, seed=37)}, {"relu1_1": losses.mean_gram(_rand(1, 3, 4, 4, seed=38))})
    assert torch.autograd.gradcheck(lambda f, x: loss({"relu1_1": f}, x)[0], (fa, img), eps=1e-6, atol=1e-6)


# --- invariances -----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_style_loss_ignores_a_spatial_permutation_of_positions(norm):
    f = _rand(1, 6, 5, 7, seed=40, positive=True)
    a = losses.mean_gram(_rand(1, 6, 5, 7, seed=41, positive=True))
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(42))
    shuffled = f.reshape(1, 6, 35)[..., perm].reshape(1, 6, 5, 7)
    assert not torch.equal(shuffled, f)
    assert losses.style_layer_loss(shuffled, a, norm).item() == pytest.approx(losses.style_layer_loss(f, a, norm).item(), rel=1e-12)
    # ... while the content loss does see where things are
    assert losses.content_loss(shuffled, f, norm).item() > 1e-3


@pytest.fixture(scope="module")
def random_vgg():
    from nst_core import network

    return network.load_network("random:0", device="cpu")


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_style_loss_is_zero_for_the_style_image_itself(random_vgg, norm):
    """Through the real (random-weight) VGG-19: E_l(style image) = 0 at every default layer."""
    from nst_core import engine, images
    from nst_core.params import DEFAULT_STYLE_LAYERS

    style = images.resized_tensor(images.load_image(sample_image("starry_night.jpg")), long_side=64)
    other = images.resized_tensor(images.load_image(sample_image("tubingen.jpg")), long_side=64)
    targets = engine.style_targets(random_vgg, style, DEFAULT_STYLE_LAYERS)
    for name in DEFAULT_STYLE_LAYERS:
        # scale of the paper form: sum (A/M)^2 / (4 N^2), so tolerances are relative in both forms
        scale = 1.0 if norm == "target" else float(targets[name].square().sum()) / (4 * targets[name].shape[-1] ** 2)
        own = random_vgg.features(style.unsqueeze(0), [name])[name]
        assert losses.style_layer_loss(own, targets[name], norm).item() <= 1e-9 * scale, name
        photo = random_vgg.features(other.unsqueeze(0), [name])[name]
        assert losses.style_layer_loss(photo, targets[name], norm).item() > 1e-3 * scale, name


def _symmetric_noise(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise for ``[B, N, N]`` matrices, symmetric in the last two dimensions: a Gram
    target moved by ``A * (1 + eps * noise)`` stays symmetric, as every style target is."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (noise + noise.transpose(-1, -2)) / 2**0.5


def test_gram_target_split_is_exactly_symmetric():
    """:meth:`losses.GramTarget.of` splits ``(A + A^T) / 2``: the one-step bf16 style term's backward takes
    ``D + D^T`` as ``2 D``. A Gram computed in float32 may differ from its transpose in the last bit."""
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(2, 24, 700, generator=g)
    gram = flat @ flat.transpose(1, 2) / 700
    gram[:, 0, 1] = torch.nextafter(gram[:, 0, 1], torch.tensor(float("inf")))  # one entry a bit off its mirror
    target = losses.GramTarget.of(gram)
    assert torch.equal(target.minus_high, target.minus_high.transpose(1, 2))
    assert torch.equal(target.low, target.low.transpose(1, 2))
    assert torch.equal(target.gram, gram)  # the target itself as given (float32 paths, the energy)
    split = -target.minus_high.float() + target.low
    assert float((split - gram).abs().max()) <= float(gram.abs().max()) * 2**-23


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mkldnn", [True, False], ids=["onednn", "native"])
def test_bf16_gram_difference_is_rounded_relative_to_the_difference(layout, mkldnn):
    """bf16 features: ``G/M - A`` is computed in the product's float32 accumulator, so it is off by about
    bf16's rounding of the *difference* (measured 1.6-1.8e-3 of it, on oneDNN's path and on PyTorch's
    own), where rounding the Gram first is off by 16-24 % of it; its gradient is off by bf16's rounding."""
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 16, 24, 20, generator=g).relu().bfloat16().contiguous(memory_format=layout)
    exact_gram = losses.mean_gram(features.double())
    target = (exact_gram * (1 + 0.01 * _symmetric_noise(exact_gram.shape, g))).float()  # 1 % away, still a Gram's shape
    exact = exact_gram - target.double()
    wide = features.double().requires_grad_(True)
    (expected,) = torch.autograd.grad((losses.mean_gram(wide) - target.double()).square().sum(), wide)
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        ours = features.clone().requires_grad_(True)
        difference = losses.mean_gram_difference(ours, losses.GramTarget.of(target))
        (gradient,) = torch.autograd.grad(difference.square().sum(), ours)
    assert difference.dtype == torch.float32 and gradient.dtype == torch.bfloat16
    assert float((difference.double() - exact).norm() / exact.norm()) < 4e-3  # bf16's unit roundoff is 3.9e-3
    assert float((gradient.double() - expected).norm() / expected.norm()) < 8e-3  # two roundings: dD, then dF
    assert gradient.is_contiguous(memory_format=layout)  # in the features' own layout
    fp32 = losses.mean_gram_difference(features.float(), losses.GramTarget.of(target))
    assert float((fp32.double() - exact).norm() / exact.norm()) < 1e-4


@pytest.mark.parametrize("norm", NORMALIZATIONS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bf16_style_term_in_one_step_is_the_composed_formula(norm, layout):
    """bf16 features: :func:`losses.style_layer_loss` computes ``E_l`` and its gradient in one step; both
    agree with the same maths composed by autograd (the difference, then :func:`gram_difference_loss`)
    to float32 rounding, per item of a batch, and against float64 to bf16's rounding."""
    g = torch.Generator().manual_seed(7)
    features = torch.randn(3, 16, 12, 10, generator=g).relu().bfloat16().contiguous(memory_format=layout)
    gram = losses.mean_gram(features.double())
    target = losses.GramTarget.of((gram * (1 + 0.02 * _symmetric_noise(gram.shape, g))).float())
    weights = torch.tensor([0.5, 1.0, 2.0])  # a different upstream gradient per item

    def value_and_gradient(term):
        x = features.clone().requires_grad_(True)
        value = term(x)
        (gradient,) = torch.autograd.grad((value * weights).sum(), x)
        return value, gradient

    one_step = value_and_gradient(lambda x: losses.style_layer_loss(x, target, norm))
    composed = value_and_gradient(lambda x: losses.gram_difference_loss(losses.mean_gram_difference(x, target), target.energy, norm))
    torch.testing.assert_close(one_step[0], composed[0], rtol=1e-5, atol=0)
    assert one_step[1].dtype == torch.bfloat16 and one_step[1].is_contiguous(memory_format=layout)
    assert float((one_step[1].double() - composed[1].double()).norm() / composed[1].double().norm()) < 5e-4  # measured: equal
    exact = value_and_gradient(lambda x: losses.style_layer_loss(x.double(), target.gram.double(), norm))
    assert float((one_step[0].double() - exact[0]).norm() / exact[0].norm()) < 2e-3  # measured 3.4e-4
    assert float((one_step[1].double() - exact[1]).norm() / exact[1].norm()) < 8e-3  # measured 3.8e-3: two roundings, dD then dF


@pytest.mark.parametrize("norm", NORMALIZATIONS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bf16_content_term_is_a_float32_sum(norm, layout):
    """bf16 features: the content term is summed and returned in float32 (a bfloat16 result would be
    rounded to 0.2 %, the size of the early-stopping rule's steps), read in either layout, per item
    against a target shared by the batch."""
    g = torch.Generator().manual_seed(11)
    features = torch.randn(2, 32, 12, 10, generator=g).relu().bfloat16().contiguous(memory_format=layout)
    target = torch.randn(1, 32, 12, 10, generator=g).relu().bfloat16().contiguous(memory_format=layout)
    term = losses.content_loss(features, target, norm)
    exact = losses.content_loss(features.double(), target.double(), norm)
    assert term.dtype == torch.float32 and term.shape == (2,)
    assert float(((term.double() - exact) / exact).abs().max()) < 2e-4  # measured <= 4.1e-5: bf16 rounds each element, the sum averages
    alone = torch.cat([losses.content_loss(features[b : b + 1], target, norm) for b in range(2)])
    torch.testing.assert_close(term, alone, rtol=1e-6, atol=0)
