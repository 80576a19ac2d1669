"""How the trunk runs (nst_core.execution) and the exact rewrites of the work around it.

* the choice between layouts is measured once per device and shape class, cached, and said
  (``StyleResult.execution``, ``meta.json``); float64 is never re-laid out;
* the decision rule, the candidates and the CUDA backend settings (checked here without a GPU:
  they are plain functions of the device and the timings);
* the bf16 weight copy is bit for bit what autocast over the float32 trunk computes;
* the Gram matrix's one-product backward and its channels-last input equal autograd's own;
* the L-BFGS ring buffers, past a full history, give the textbook two-loop recursion's steps, in
  every way of making the history's products (two orientations of the BLAS product, oneDNN's),
  which is measured once per device, dtype and size.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import sample_image

from nst_core import engine, execution, images, measure, optim, stylize
from nst_core.execution import EAGER_NCHW, Execution, candidates, fastest, shape_class
from nst_core.losses import gram_matrix
from nst_core.network import load_network
from nst_core.optim import BatchedLBFGS
from nst_core.params import StyleParams
from nst_run import items
from nst_run.paths import ItemPaths

LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1", "relu4_2")
CHANNELS_LAST = Execution("channels_last")


def test_the_default_stays_unless_another_is_clearly_faster():
    assert fastest({EAGER_NCHW: 1.0, CHANNELS_LAST: 0.5}) == CHANNELS_LAST
    assert fastest({EAGER_NCHW: 1.0, CHANNELS_LAST: 0.97}) == EAGER_NCHW  # within the margin: noise
    assert fastest({EAGER_NCHW: 0.5, CHANNELS_LAST: 1.0}) == EAGER_NCHW
    with pytest.raises(ValueError):
        fastest({})


def test_candidates_per_dtype_and_compile():
    assert candidates(torch.float64) == [EAGER_NCHW]  # the exactness tests run as given
    assert candidates(torch.float32) == [EAGER_NCHW, CHANNELS_LAST]
    compiled = candidates(torch.float32, allow_compile=True)
    assert [e.label for e in compiled] == ["nchw", "channels_last", "nchw+compile", "channels_last+compile"]


def test_shape_classes_group_aspect_ratios_and_batches_not_sizes():
    assert shape_class((1, 3, 192, 256)) == shape_class((1, 3, 256, 192)) == shape_class((1, 3, 144, 256))
    assert shape_class((1, 3, 96, 128)) != shape_class((1, 3, 192, 256))
    # batches run in the layout their items run in alone (batched equals alone)
    assert shape_class((2, 3, 192, 256)) == shape_class((1, 3, 192, 256))


def test_cudnn_autotune_is_set_for_cuda_only():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        execution.configure_backends(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        execution.configure_backends(torch.device("cuda"))  # a flag: settable without a GPU
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_the_choice_is_measured_once_per_shape_class_and_recorded(monkeypatch):
    net = load_network("random:0").at_precision("fp32")
    timed: list[tuple[str, tuple[int, ...]]] = []
    styled: set[frozenset[str]] = set()
    real = execution.time_pass

    def counting(network, option, shape, layers, repeats=execution.MEASURE_REPEATS, warmup=True, style_layers=()):
        timed.append((option.label, tuple(shape)))
        styled.add(frozenset(style_layers))
        return real(network, option, shape, layers, repeats=repeats, warmup=warmup, style_layers=style_layers)

    monkeypatch.setattr(execution, "time_pass", counting)
    execution.clear_choices()
    first = execution.choose_execution(net, (1, 3, 24, 32), LAYERS, style_layers=LAYERS[:5])
    assert styled == {frozenset(LAYERS[:5])}  # the optimisation's pass: the style term's Grams are timed too
    per_class = 2 * (1 + execution.MEASURE_REPEATS)  # a warm-up, then the candidates in turn
    assert [label for label, _ in timed] == ["nchw", "channels_last"] * (1 + execution.MEASURE_REPEATS)
    assert {shape for _, shape in timed} == {(1, 3, 32, 32)}  # measured at the class's shape, not the first image's
    assert execution.choose_execution(net, (1, 3, 32, 24), LAYERS, style_layers=LAYERS[:5]) == first  # same class: no new measurement
    assert len(timed) == per_class
    execution.choose_execution(net, (1, 3, 48, 64), LAYERS, style_layers=LAYERS[:5])
    assert len(timed) == 2 * per_class
    execution.choose_execution(net, (1, 3, 24, 32), LAYERS, style_layers=LAYERS[:2])  # another loss: its own measurement
    assert len(timed) == 3 * per_class
    assert execution.choose_execution(net, (1, 3, 24, 32), LAYERS, dtype=torch.float64) == EAGER_NCHW
    assert len(timed) == 3 * per_class

    styled.clear()
    execution.clear_choices()  # the stylising below measures again, through the engine's own calls

    params = StyleParams(size=32, iterations=3, weights="random:0", precision="fp32", tolerance=0)
    content, style = (images.load_image(sample_image(name)) for name in ("tubingen.jpg", "starry_night.jpg"))
    result = stylize(content, style, params, network=load_network("random:0"))
    assert result.execution in ("nchw", "channels_last")
    assert styled == {frozenset(params.style_layers)}  # the engine times its own loss's layers
    paths = ItemPaths("/nowhere/items", "0" * 64, "png")
    meta = items.build_meta(item="0" * 64, row={}, params=params, inputs={}, weights="random:0", weights_id="random:0", result=result, paths=paths)
    assert meta["execution"] == result.execution and meta["precision"] == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_timed_pass_runs_the_style_term_at_the_style_layers_only(monkeypatch, precision):
    """The layout is chosen by the optimisation's pass: the Gram products and their backward at the style
    layers are in it (they run differently in each layout), the other layers get a gradient of ones."""
    net = load_network("random:0").at_precision(precision)
    seen: list[tuple[int, torch.dtype]] = []
    real = execution.style_layer_loss

    def counting(features, target, normalization="target"):
        seen.append((features.shape[1], features.dtype))
        loss = real(features, target, normalization)
        assert loss.shape == (1,) and torch.isfinite(loss).all()
        return loss

    monkeypatch.setattr(execution, "style_layer_loss", counting)
    for layout in execution.LAYOUTS:
        seconds = execution.time_pass(net, Execution(layout), (1, 3, 32, 32), LAYERS, repeats=2, style_layers=LAYERS[:3])
        assert 0 < seconds < float("inf")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen == [(64, dtype), (128, dtype), (256, dtype)] * 2 * 3  # per layout: a warm-up pass and two timed
    seen.clear()
    execution.time_pass(net, EAGER_NCHW, (1, 3, 32, 32), LAYERS, repeats=1)
    assert seen == []  # no style layers: the bare trunk (benchmarks/engine.py's figure)


def test_a_larger_cpu_batch_is_taken_only_when_clearly_cheaper_per_item():
    assert execution.cheapest_batch({1: 26.3, 2: 19.0, 4: 16.1, 8: 15.9}) == 4  # 8 is within the margin of 4
    assert execution.cheapest_batch({1: 1.0, 2: 0.97, 4: 0.99}) == 1  # noise, not a gain
    assert execution.cheapest_batch({4: 0.5, 1: 1.0, 2: 1.2}) == 4  # sizes in any order; 2 worse, 4 better
    with pytest.raises(ValueError):
        execution.cheapest_batch({})


def test_the_cpu_batch_size_is_measured_once_per_shape_class(monkeypatch):
    net = load_network("random:0").at_precision("fp32")
    timed: list[tuple[int, ...]] = []
    real = execution.time_pass

    def counting(network, option, shape, layers, repeats=execution.MEASURE_REPEATS, warmup=True, style_layers=()):
        timed.append(tuple(shape))
        return real(network, option, shape, layers, repeats=repeats, warmup=warmup, style_layers=style_layers)

    monkeypatch.setattr(execution, "time_pass", counting)
    execution.clear_choices()
    chosen = execution.choose_batch_size(net, (1, 3, 24, 32), LAYERS, EAGER_NCHW, limit=4)
    assert chosen in (1, 2, 4)
    # a warm-up pass at each size up to the limit, then the sizes in turn
    assert [shape[0] for shape in timed] == [1, 2, 4] * (1 + execution.MEASURE_REPEATS)
    assert all(shape[1:] == (3, 32, 32) for shape in timed)  # the class's shape, whichever image came first
    assert execution.choose_batch_size(net, (1, 3, 32, 24), LAYERS, EAGER_NCHW, limit=4) == chosen  # same class
    assert len(timed) == 3 * (1 + execution.MEASURE_REPEATS)
    assert execution.choose_batch_size(net, (1, 3, 24, 32), LAYERS, EAGER_NCHW, limit=1) == 1  # memory for one: not measured
    assert len(timed) == 3 * (1 + execution.MEASURE_REPEATS)
    params = StyleParams(size=32, weights="random:0", precision="fp32")
    first = engine.cpu_batch_size(params, 24, 32, limit=4)  # the engine's entry point: in the layout it chose
    assert first in (1, 2, 4)
    measured = len(timed)
    assert engine.cpu_batch_size(params, 24, 32, limit=4) == first and len(timed) == measured  # cached
    assert engine.cpu_batch_size(params, 24, 32, limit=1) == 1


def test_bf16_weight_copy_is_autocast_bit_for_bit():
    net = load_network("random:0").at_precision("bf16")
    x = torch.rand(1, 3, 40, 56, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = net.features(x, LAYERS)
    ours = execution.features(net, x, LAYERS)
    assert execution.trunk_copy(net.features, "bf16").layers["conv1_1"].weight.dtype == torch.bfloat16
    assert net.features.layers["conv1_1"].weight.dtype == torch.float32  # the original is untouched
    for name in LAYERS:  # returned as computed, bfloat16 (the losses widen them)
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], reference[name]), name
    g_ref, g_ours = (torch.autograd.grad(sum(f.square().sum() for f in feats.values()), x)[0] for feats in (reference, ours))
    assert torch.equal(g_ref, g_ours)


@pytest.mark.parametrize("layout", execution.LAYOUTS)
def test_channels_last_features_give_the_same_features(layout):
    net = load_network("random:0").at_precision("fp32")
    x = torch.rand(1, 3, 40, 56)
    plain = execution.features(net, x, LAYERS)
    other = execution.features(net, x, LAYERS, Execution(layout))
    for name in LAYERS:
        assert torch.allclose(other[name], plain[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("channels_last", [False, True])
def test_gram_backward_is_autograds(channels_last):
    features = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(gram_matrix, (features,))
    flat = features.detach().reshape(2, 5, 12)
    assert torch.allclose(gram_matrix(features), flat @ flat.transpose(1, 2), rtol=1e-12)


def _textbook_direction(g: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]], h: float) -> torch.Tensor:
    """-H g by Nocedal & Wright's Algorithm 7.4 for one item (float64), newest pair last."""
    q, alphas = -g.clone(), []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (y @ s)
        q = q - alpha * y
        alphas.append(alpha)
    r = h * q
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        beta = (y @ r) / (y @ s)
        r = r + s * (alpha - beta)
    return r


@pytest.mark.parametrize(
    ("inner", "combined", "dtype"),
    [(i, c, torch.float64) for i in ("rows_first", "history_first") for c in ("mm", "chunked")]
    + [(i, c, torch.float32) for i in ("rows_first", "history_first", "onednn") for c in ("mm", "chunked", "onednn")],
)
def test_lbfgs_ring_buffer_steps_are_the_two_loop_recursion_past_a_full_history(monkeypatch, inner, combined, dtype):
    """Each way of making the history's two products gives the textbook two-loop direction, through two
    wraps of the ring buffer (oneDNN's is float32 only, so float32 runs too, to float32's rounding)."""
    chosen: dict = {}
    ways = optim.ProductWays(inner, combined)
    monkeypatch.setattr(optim, "_PRODUCTS", chosen)
    monkeypatch.setattr(optim, "measure_products", lambda history, repeats=3: chosen.setdefault(optim._products_key(history), ways))
    used: list[tuple[str, str]] = []  # the way of every product a step makes, from the first pair on (the ring not yet full)
    real_inner, real_combine = optim.inner_products, optim.combine
    monkeypatch.setattr(optim, "inner_products", lambda rows, history, way="rows_first": used.append(("inner", way)) or real_inner(rows, history, way))
    monkeypatch.setattr(optim, "combine", lambda c, history, out, way="mm": used.append(("combine", way)) or real_combine(c, history, out, way))
    torch.manual_seed(0)
    d, history = 12, 4
    curvature = (torch.rand(d, dtype=torch.float64) + 0.5).to(dtype)
    x = torch.randn(1, d, dtype=torch.float64).to(dtype)
    opt = BatchedLBFGS(1, lr=0.5, history=history, device="cpu")
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    previous: tuple[torch.Tensor, torch.Tensor] | None = None
    tolerance = {"rtol": 1e-10, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for _ in range(3 * history):  # wraps the ring buffer twice
        grad = curvature * x
        if previous is not None:
            s, y = (x - previous[0])[0].double(), (grad - previous[1])[0].double()
            pairs = (pairs + [(s, y)])[-history:]
        before = x.clone()
        previous = (before, grad.clone())
        opt.step(x, grad)
        if pairs:  # not the first step: x moved by lr times the direction
            s, y = pairs[-1]
            expected = 0.5 * _textbook_direction(grad[0].double(), pairs, float((y @ s) / (y @ y)))
            torch.testing.assert_close((x - before)[0].double(), expected, **tolerance)
    assert list(chosen.values()) == [ways]  # the ways were decided once, at the first pair
    assert len(used) == 2 * (3 * history - 1) and set(used) == {("inner", inner), ("combine", combined)}  # and used from then on


def test_the_history_products_ways_are_measured_once_per_size_class(monkeypatch):
    """Every way computes ``rows @ history.T`` (``inner_products``) and ``coefficients @ history``
    (``combine``); the fastest of each is measured once per device, dtype, history length and size class
    of D (within a factor of two), then reused without timing. oneDNN's product is a candidate for float32
    on a CPU, not for float64; the chunked combine also for a D its blocks do not divide (one block)."""
    monkeypatch.setattr(optim, "_PRODUCTS", {})
    timings: list[float] = []
    real = measure.time.perf_counter
    monkeypatch.setattr(measure.time, "perf_counter", lambda: timings.append(0.0) or real())
    g = torch.Generator().manual_seed(0)
    history, rows, coefficients = torch.randn(8, 1000, generator=g), torch.randn(3, 1000, generator=g), torch.randn(1, 8, generator=g)
    onednn = ["onednn"] if torch.backends.mkldnn.is_available() else []  # in the pinned PyTorch builds
    assert optim.inner_ways(history) == ["rows_first", "history_first", *onednn]
    assert optim.combine_ways(history) == ["mm", "chunked", *onednn]
    assert "onednn" not in optim.inner_ways(history.double()) + optim.combine_ways(history.double())
    ways = optim.measure_products(history)
    assert ways.inner in optim.inner_ways(history) and ways.combine in optim.combine_ways(history)
    measured = len(timings)
    assert measured > 0
    optim.measure_products(torch.zeros(8, 700))  # the same size class: not measured again
    assert len(timings) == measured
    optim.measure_products(torch.zeros(8, 5000))  # another class is
    assert len(timings) > measured
    for way in optim.inner_ways(history):
        torch.testing.assert_close(optim.inner_products(rows, history, way), rows @ history.T, rtol=1e-5, atol=1e-4)
    for wide in (history, torch.randn(8, 1001, generator=g)):  # 1001: not divided into blocks
        for way in optim.combine_ways(wide):
            out = torch.full((1, wide.shape[1]), math.nan)
            optim.combine(coefficients, wide, out, way)
            torch.testing.assert_close(out, coefficients @ wide, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_content_targets_run_in_the_layout_the_optimisation_chose(monkeypatch, layout):
    """Whatever the measurement picks, the content targets are computed the way the optimisation runs:
    started from the content image, the first content loss is exactly zero (in bf16 another layout
    rounds differently: 1.4e-5 was seen when the measurement picked channels-last)."""
    forced = Execution(layout)
    monkeypatch.setattr(execution, "fastest", lambda timings, margin=execution.MARGIN: forced)
    monkeypatch.setattr(execution, "time_pass", lambda *args, **kwargs: 1.0)
    execution.clear_choices()
    try:
        params = StyleParams(size=32, iterations=2, weights="random:0", precision="bf16", tolerance=0)
        content, style = (images.load_image(sample_image(name)) for name in ("tubingen.jpg", "starry_night.jpg"))
        result = stylize(content, style, params, network=load_network("random:0"))
    finally:
        execution.clear_choices()  # later tests measure afresh
    assert result.execution == layout
    assert result.history[0]["content"] == 0.0


@pytest.mark.parametrize("layout", execution.LAYOUTS)
def test_trunk_copies_store_weights_as_their_execution_runs_them(layout):
    """A channels-last execution gets channels-last filters (else every pass re-lays them out), bf16 ones
    bf16; the copy is made once and computes what the original computes."""
    net = load_network("random:0").at_precision("fp32")
    copy = execution.trunk_copy(net.features, "fp32", layout)
    assert copy is execution.trunk_copy(net.features, "fp32", layout)
    weight = copy.layers["conv2_1"].weight
    assert weight.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert (copy is net.features) == (layout == "nchw")
    x = torch.rand(1, 3, 40, 56)
    for name, f in copy(x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x, LAYERS).items():
        torch.testing.assert_close(f, net.features(x, LAYERS)[name], rtol=1e-4, atol=1e-5)


def test_a_cpu_worker_measures_its_batch_size_once_and_within_memory(monkeypatch):
    from nst_run import execute
    from nst_run.manifest import RowSpec
    from nst_run.planning import Work

    calls: list[tuple[object, ...]] = []
    real = engine.cpu_batch_size

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(engine, "cpu_batch_size", counting)
    monkeypatch.setattr(execute, "_CPU_BATCH_SIZES", {})
    params = StyleParams(size=32, weights="random:0", precision="fp32")

    def work(content_size: tuple[int, int] | None, p: StyleParams = params) -> Work:
        row = RowSpec(row=0, id="r0", content_uri="c.jpg", style_uri="s.jpg", params=p)
        return Work(row, "0" * 64, {"content": "a", "style": "b"}, "random:0", content_size=content_size)

    size = execute.auto_batch_size(work((400, 300)))
    assert size in execution.CPU_BATCH_SIZES and len(calls) == 1
    assert execute.auto_batch_size(work((400, 300))) == size and len(calls) == 1  # known: no wait for the CPU's thread
    assert execute.auto_batch_size(work(None)) == 1  # size unknown yet
    assert execute.auto_batch_size(work((300, 400)), 1) == 1 and len(calls) == 1  # a group of one: nothing to measure
    if not torch.cuda.is_available():  # a device this machine lacks: the optimisation fails the item and says why
        assert execute.auto_batch_size(work((400, 300), params.model_copy(update={"device": "cuda:0"}))) == 1
    assert execute.available_memory_bytes() > 0
    monkeypatch.setattr(execute, "available_memory_bytes", lambda: execute.estimate_item_bytes(24, 32, params))
    assert execute.auto_batch_size(work((400, 300))) == 1  # half the memory holds less than two items
