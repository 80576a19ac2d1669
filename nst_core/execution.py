"""How the VGG-19 trunk runs on the device at hand: memory layout (and, opt-in, ``torch.compile``),
chosen by a short measurement, never assumed.

Which layout is fastest depends on the machine, not on the code: on one 2-core Xeon with
AVX512-BF16/AMX a bf16 forward+backward ran 2x faster channels-last than NCHW (issue 14); on the
2-core AMD EPYC (AVX512-BF16) that built this, from equal to 2x faster depending on size and run
(at 256 px: 412 against 828 ms in one run), fp32 channels-last 5-10 % slower; on CUDA
channels-last is what the bf16 tensor-core kernels want; on a 2-core AMD EPYC with AVX2 only
(fp32), channels-last 7-10 % faster at 256 px. So :func:`choose_execution`, when a network is first
used on a device for a shape class, times the optimisation's pass per candidate (:func:`candidates`:
forward, the style term's Grams, input-gradient backward) and keeps the fastest (:func:`fastest`) for
the rest of the process. The choice is in
:attr:`nst_core.engine.StyleResult.execution` and ``meta.json``'s ``execution``.

``torch.compile`` (inductor) is a candidate only when asked for (``NST_TORCH_COMPILE=1``): on the
2-core CPU it did not pay. At 128 px (bf16, one thread) compiling the trunk's forward+backward took
89 s, and the compiled pass ran 150-178 ms against eager's 169-173 ms: the compile time alone is
500+ iterations, and every new image shape compiles again. It is untried on a GPU.

CUDA: cuDNN's autotuner is switched on (:func:`configure_backends`): an optimisation runs hundreds
of passes of one fixed shape, so one search per shape pays for itself. Not measured yet: a batch
whose items stop early changes shape at each departure, and each new shape is searched again;
``NST_CUDNN_BENCHMARK=0`` turns the autotuner off, for ``benchmarks/throughput.py`` to compare the two
on a GPU. CUDA graphs of the fixed-shape iteration are not used: nothing here could test them on a GPU.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import Tensor

from nst_core.losses import GramTarget, style_layer_loss
from nst_core.measure import MARGIN, fastest, time_in_turns
from nst_core.measure import sync as _sync
from nst_core.network import LAYER_NAMES, Network, VGGFeatures

LAYOUTS = ("nchw", "channels_last")

MEASURE_REPEATS = 5
"""Timed passes per candidate (after one untimed pass that warms caches and kernels); the minimum counts.

Five, not three: on the 2-core AVX2 EPYC (a VM) one pass at 256 px varied from 590 to 910 ms within a
process, and the first timed passes after the warm-up are often still slow. With three, a fresh
process chose NCHW in three runs out of three where channels-last was 7-10 % faster; with five (and
the style term timed), channels-last in four out of four. It costs two passes per candidate more, once
per shape class and process (7.5 s at 256 px on that CPU in fp32).

The candidates take turns, one pass each per round: a load that comes and goes (another process on a
2-core machine) weighs on every candidate alike. Timed one after the other, the one timed while the
load was there loses: in one run beside a soak, the engine chose channels-last at 256 px where the
benchmark's bare trunk then ran NCHW 11 % faster."""


COMPILE_ENV = "NST_TORCH_COMPILE"
CUDNN_BENCHMARK_ENV = "NST_CUDNN_BENCHMARK"


@dataclass(frozen=True)
class Execution:
    """One way to run the trunk: a memory layout, eager or compiled."""

    layout: str = "nchw"
    compiled: bool = False

    @property
    def label(self) -> str:
        """What ``meta.json`` records: ``nchw``, ``channels_last``, ``channels_last+compile``."""
        return self.layout + ("+compile" if self.compiled else "")


EAGER_NCHW = Execution()


def candidates(dtype: torch.dtype, allow_compile: bool = False) -> list[Execution]:
    """The ways worth measuring for inputs of ``dtype``, PyTorch's default (NCHW, eager) first.

    Float64 (the exactness tests) runs as given: there is nothing to gain and bits to keep.
    """
    if dtype != torch.float32:
        return [EAGER_NCHW]
    eager = [Execution(layout) for layout in LAYOUTS]
    return eager + ([Execution(layout, compiled=True) for layout in LAYOUTS] if allow_compile else [])


def shape_class(shape: Sequence[int]) -> int:
    """The long side of a batch ``[B, 3, H, W]``: the shapes that share one measurement.

    The engine resizes every content image to the long side ``size``, so the images of a run differ
    only in aspect ratio, which does not change which layout is fastest enough to pay for measuring
    every exact shape. The batch size is left out on purpose: an item's result must not depend on
    its batch (batched equals alone, ``nst_core.engine.optimise``), and two layouts round the
    convolutions differently, so a batch and its items alone must run in the same layout.
    """
    return max(shape[-2], shape[-1])


def class_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """The one shape a :func:`shape_class` is measured at: a single square image of its long side.

    Measured at whichever image of the class came first, the choice depended on the order of the
    work: at 128 px the sample manifest's 128x67 image ran NCHW and channels-last alike (9.1 against
    8.9 s for a batch), so a run that met it first chose NCHW for the 128x96 one too, 15.7 s against
    11.5 s channels-last (bf16, the AMX Xeon). The square is the class's largest image.
    """
    side = shape_class(shape)
    return (1, shape[-3], side, side)


def configure_backends(device: torch.device) -> None:
    """Backend settings for ``device``, on CUDA:

    * cuDNN's autotuner (fixed shapes; see the module docstring), unless ``$NST_CUDNN_BENCHMARK`` is ``0``;
    * bf16 products reduced in float32 only: the style term's ``F F^T / M - A`` is subtracted inside the
      product's float32 accumulator (``nst_core.losses``), and cuBLAS may otherwise split the long
      reduction (a Gram's ``K`` is every position of the image) and add the parts in bf16, which puts
      the Gram's own rounding back into the difference.

    Float32 convolutions keep PyTorch's default (TF32 on Ampere and later GPUs): ``precision=fp32`` on
    CUDA is PyTorch's float32, as in the plain loop it is compared with.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = os.environ.get(CUDNN_BENCHMARK_ENV, "1") != "0"
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def features(network: Network, x: Tensor, layers: Sequence[str] | frozenset[str], execution: Execution = EAGER_NCHW) -> dict[str, Tensor]:
    """The network's features of ``x``, computed at ``network.precision`` in ``execution``'s way.

    ``bf16``: the convolutions run in bfloat16 under autocast and the features come back as they
    were computed, bfloat16: the losses compute in float32 from them (Gram matrices, loss sums;
    :func:`nst_core.losses.mean_gram_difference`), and the pixels stay float32. Returning them bfloat16
    rather than a float32 copy saves a copy of every feature map forward and a cast of its
    gradient backward, and lets the Gram matrices' backward run in bfloat16 (the gradient enters
    the bfloat16 network anyway). Only float32 inputs are cast or re-laid out; float64 (the
    exactness tests) runs as given. Channels-last features are returned channels-last (the losses
    read either layout without a copy).
    """
    if x.dtype != torch.float32:
        return network.features(x, layers)
    if execution.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    trunk = trunk_copy(network.features, network.precision, execution.layout)
    forward = _compiled(trunk) if execution.compiled else trunk
    if network.precision != "bf16":
        return forward(x, layers)
    with torch.autocast(network.device.type, dtype=torch.bfloat16):
        return forward(x, layers)


def trunk_copy(trunk: VGGFeatures, precision: str = "fp32", layout: str = "nchw") -> VGGFeatures:
    """``trunk`` with its convolutions' weights stored as ``precision`` and ``layout`` want them (a copy,
    made once per module, precision and layout; fp32 NCHW is ``trunk`` itself).

    bf16: under autocast the result is the same, bit for bit, as the float32 trunk's (autocast casts
    each weight to bfloat16 before the convolution; a weight already in bfloat16 is used as it is),
    but autocast caches its casts only for weights that require a gradient, which frozen ones do
    not: every pass cast every weight again (8 ms of a 128 px iteration's ~105 ms on one core).
    Channels-last: a convolution given a channels-last input and an NCHW weight re-lays the weight
    out in every forward and backward pass (one copy of every filter bank, twice per iteration:
    measured 7 ms of a 256 px bf16 iteration, and the trunk's pass 104 -> 83 ms at 256 px and
    29 -> 22 ms at 128 px with the weights stored channels-last). The normalisation's mean and std
    stay float32, as in the original.
    """
    if precision == "fp32" and layout == "nchw":
        return trunk
    key = (id(trunk), precision, layout)
    found = _COPIES.get(key)  # every pass comes here: no lock (another device's measurement may hold it for seconds)
    if found is None:
        with _LOCK:
            if key not in _COPIES:
                copy = deepcopy(trunk)
                if precision == "bf16":
                    copy = copy.to(torch.bfloat16)
                if layout == "channels_last":
                    copy = copy.to(memory_format=torch.channels_last)
                copy.mean, copy.std = trunk.mean.clone(), trunk.std.clone()  # type: ignore[operator]  # buffers, not Tensor.mean/std
                _COPIES[key] = (trunk, copy)  # the original is kept alive with it, so its id is never reused
            found = _COPIES[key]
    return found[1]


_CHOICES: dict[tuple[object, ...], Execution] = {}
_BATCH_SIZES: dict[tuple[object, ...], int] = {}
_COMPILED: dict[int, tuple[VGGFeatures, Callable[..., dict[str, Tensor]]]] = {}
_COPIES: dict[tuple[int, str, str], tuple[VGGFeatures, VGGFeatures]] = {}
_LOCK = threading.RLock()


def choose_execution(
    network: Network,
    shape: Sequence[int],
    layers: Sequence[str] | frozenset[str],
    dtype: torch.dtype = torch.float32,
    allow_compile: bool | None = None,
    style_layers: Sequence[str] | frozenset[str] = (),
) -> Execution:
    """How to run ``network`` on batches of ``shape`` ``[B, 3, H, W]`` up to ``layers``: measured once per
    device, precision, pooling, deepest layer, style layers and :func:`shape_class` in this process (at
    the class's own shape, :func:`class_shape`, whichever image of it comes first), then cached.

    What is timed is the optimisation's pass, the style term's Grams at ``style_layers`` included
    (:func:`time_pass`), not the bare trunk: the work around the trunk is not the same in both layouts
    (on the 2-core AVX2 EPYC in fp32 at 256 px, the bare trunk alone ran 7-10 % faster channels-last
    and a fresh process chose NCHW in three runs out of three; on the AMX Xeon at 128 px the bare
    trunks were within 5-10 % while the whole iteration was slower channels-last).

    ``allow_compile`` (default: ``$NST_TORCH_COMPILE`` is ``1``) adds compiled candidates.
    """
    configure_backends(network.device)
    allow = os.environ.get(COMPILE_ENV) == "1" if allow_compile is None else allow_compile
    options = candidates(dtype, allow)
    if len(options) == 1:
        return options[0]
    deepest = max(layers, key=LAYER_NAMES.index)
    styled = frozenset(style_layers)
    key = (str(network.device), network.precision, network.features.pooling, deepest, styled, shape_class(shape), allow)
    measured = class_shape(shape)
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]
        # Measured under the lock: two threads on one device would time each other. One pass per call
        # (time_pass's untimed pass), timed in turns after a warm-up round.
        passes = {option: functools.partial(time_pass, network, option, measured, layers, repeats=0, style_layers=styled) for option in options}
        _CHOICES[key] = fastest(time_in_turns(passes, MEASURE_REPEATS, network.device))
        return _CHOICES[key]


CPU_BATCH_SIZES = (1, 2, 4, 8)
"""The batch sizes :func:`choose_batch_size` tries on a CPU, smallest first (at most the largest)."""


def choose_batch_size(
    network: Network, shape: Sequence[int], layers: Sequence[str] | frozenset[str], execution: Execution, limit: int = CPU_BATCH_SIZES[-1]
) -> int:
    """Items per optimisation on a CPU for images of ``shape`` ``[.., 3, H, W]``: measured once per device,
    precision, pooling, deepest layer, :func:`shape_class`, execution and largest size tried, then cached.

    A CPU is compute-bound, but a batch-of-one pass leaves cores idle in the late layers (a 128 px
    image has 12x16 positions at relu5_1): measured on a 2-core AVX512-BF16 Xeon at 128 px (bf16,
    channels-last), one pass cost 26.3 ms for one item, 19.0 per item for two, 16.1 for four. Which
    size pays depends on the machine and the size, so the trunk's pass (:func:`time_pass`) is timed
    per item for each of :data:`CPU_BATCH_SIZES` up to ``limit`` (in turns, as :func:`choose_execution`
    does), and a larger batch is taken only when it costs :data:`MARGIN` less per item than the best
    smaller one (a smaller batch shows progress sooner). The loss and the optimiser cost about the
    same per item at any batch size, so the trunk decides.
    """
    sizes = [b for b in CPU_BATCH_SIZES if b <= max(1, limit)]
    if len(sizes) == 1 or network.device.type != "cpu":
        return 1
    deepest = max(layers, key=LAYER_NAMES.index)
    key = (str(network.device), network.precision, network.features.pooling, deepest, shape_class(shape), execution, sizes[-1])
    with _LOCK:
        if key in _BATCH_SIZES:
            return _BATCH_SIZES[key]
        passes = {b: functools.partial(time_pass, network, execution, (b, *class_shape(shape)[1:]), layers, repeats=0) for b in sizes}
        seconds = time_in_turns(passes, MEASURE_REPEATS, network.device)
        _BATCH_SIZES[key] = cheapest_batch({b: seconds[b] / b for b in sizes})
        return _BATCH_SIZES[key]


def cheapest_batch(seconds_per_item: Mapping[int, float], margin: float = MARGIN) -> int:
    """The batch size to use given seconds per item at each size tried: the smallest, replaced by a larger
    one only when that costs ``margin`` less per item than the best smaller one."""
    if not seconds_per_item:
        raise ValueError("no batch sizes were timed")
    sizes = sorted(seconds_per_item)
    chosen = sizes[0]
    for b in sizes[1:]:
        if seconds_per_item[b] < (1.0 - margin) * seconds_per_item[chosen]:
            chosen = b
    return chosen


def time_pass(
    network: Network,
    execution: Execution,
    shape: Sequence[int],
    layers: Sequence[str] | frozenset[str],
    repeats: int = MEASURE_REPEATS,
    warmup: bool = True,
    style_layers: Sequence[str] | frozenset[str] = (),
) -> float:
    """Seconds of one forward and input-gradient backward of the trunk: the fastest of ``repeats`` timed
    passes, after an untimed one (``warmup``: it warms caches and kernels, and compiles). ``inf`` when
    none is timed (``repeats=0``: a warm-up alone).

    With ``style_layers`` the pass is the optimisation's own: the features at those layers go through
    the style term (:func:`nst_core.losses.style_layer_loss`: the Gram product, the difference and its
    backward, against a stand-in target), so the work that runs around the trunk in one layout and not
    the other is in the time; the other layers get a gradient of ones, as in the bare pass.
    """
    x = torch.rand(tuple(shape), device=network.device).requires_grad_(True)
    best = math.inf
    for k in range(repeats + int(warmup)):
        _sync(network.device)
        start = time.perf_counter()
        feats = features(network, x, layers, execution)
        outputs = [style_layer_loss(f, _stand_in_target(f)).sum() if name in style_layers else f for name, f in feats.items()]
        torch.autograd.grad(outputs, x, [torch.ones_like(out) for out in outputs])
        _sync(network.device)
        if k > 0 or not warmup:
            best = min(best, time.perf_counter() - start)
    return best


def _stand_in_target(features: Tensor) -> GramTarget:
    """A style target of the right size for timing (the identity: any target costs the same)."""
    return GramTarget.of(torch.eye(features.shape[1], device=features.device).unsqueeze(0))


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Bytes of tensors on ``device`` alive at the peak of ``run()``, above what was alive before it.

    CUDA: the caching allocator's own count (``torch.cuda.max_memory_allocated``, reset first), of a
    second call: ``run`` is called once before, unmeasured, because cuDNN's autotuner tries algorithms
    at a shape's first pass in workspaces the peak would count (a batch of a new size). CPU:
    the profiler's memory timeline (every tensor's creation and destruction; its export is deprecated
    in favour of CUDA-only snapshots, hence the warning filter): what the same tensors would occupy on a
    GPU, without cuDNN's workspaces. Used to check :func:`nst_core.engine.estimate_item_bytes`, which
    sizes automatic batches (``tests/unit/test_memory_estimate.py``, ``benchmarks/memory.py``).
    """
    if device.type == "cuda":
        run()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = os.path.join(folder, "timeline.raw.json.gz")
        prof.export_memory_timeline(path, device="cpu")
        with gzip.open(path, "rt") as f:
            events = json.load(f)  # in time order: (ns, action, signed bytes, category); tensors alive before at -1
    alive = peak = 0
    for t, _action, numbytes, _category in events:
        if t != -1:  # what was alive before the run is not counted
            alive += numbytes
            peak = max(peak, alive)
    return peak


def clear_choices() -> None:
    """Forget the measured choices (tests use it to exercise the measurement again)."""
    with _LOCK:
        _CHOICES.clear()
        _BATCH_SIZES.clear()


def _compiled(trunk: VGGFeatures) -> Callable[..., dict[str, Tensor]]:
    """``trunk`` compiled by inductor, once per module."""
    key = id(trunk)
    found = _COMPILED.get(key)
    if found is None:
        with _LOCK:
            found = _COMPILED.setdefault(key, (trunk, torch.compile(trunk)))
    return found[1]
