"""The engine and the flow on a CUDA GPU: what the CPU suite cannot run.

Skipped where there is no CUDA device (CI's machine has none). A session lent a GPU machine runs
them first in ``benchmarks/device/run.sh`` (``python3 -m pytest tests/gpu``), before the GPU
benchmarks, so that a broken CUDA path is a failed test, not a puzzling figure. They hold the CUDA
path to what the CPU suite holds the CPU path to, with the same bounds where the reason for a bound
is the same (batched equals alone, the memory estimate within 20 %, the quality criterion).

What differs on CUDA and is checked here: ``precision=auto`` resolves to bf16 on a bf16 GPU, cuDNN's
autotuner is on, the history's products have no oneDNN candidate, peak memory is the caching
allocator's own count (``torch.cuda.max_memory_allocated``: cuDNN's workspaces included), and the flow's
automatic batch size comes from free GPU memory (two same-size rows share one optimisation).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_quality_criterion, sample_image

from nst_core import execution, images, optim, storage, stylize
from nst_core.engine import Job, estimate_item_bytes, stylize_batch
from nst_core.network import load_network, resolve_device, resolve_precision
from nst_core.params import StyleParams

# NST_REQUIRE_CUDA=1 (benchmarks/device/run.sh): run them even without CUDA, so that a GPU machine whose
# PyTorch does not see its GPU fails here instead of skipping everything.
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("NST_REQUIRE_CUDA") != "1", reason="no CUDA device here (benchmarks/device/run.sh runs these on a GPU machine)"
)

WEIGHTS = "random:0"
CUDA = torch.device("cuda")
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
NEEDS_BF16 = pytest.mark.skipif(torch.cuda.is_available() and not BF16, reason="this GPU has no bf16")


@pytest.fixture(scope="module")
def cuda_net():
    return load_network(WEIGHTS, device=CUDA)


def test_auto_precision_is_bf16_on_a_bf16_gpu_and_the_backends_are_set():
    assert resolve_precision("auto", CUDA) == ("bf16" if BF16 else "fp32")
    execution.configure_backends(CUDA)
    assert torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction  # the style term's difference is rounded once
    current = torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda") == resolve_device("auto") == resolve_device(str(current)) == current  # one name per GPU


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=NEEDS_BF16)])
def test_a_default_run_on_the_gpu_meets_the_quality_criterion(cuda_net, tubingen, starry, precision):
    """Defaults at 128 px (<= 300 iterations, content start): the style loss falls tenfold, the result
    comes back as a float32 CPU image, and the judge (on the CPU, as the flow's quality score) sees the
    criterion of tests/unit/test_engine_stylize.py: style distance >= 5x lower than the photo's, content
    distance below the painting's."""
    result = stylize(tubingen, starry, StyleParams(size=128, weights=WEIGHTS, device="cuda", precision=precision), network=cuda_net)
    assert torch.device(result.device).type == "cuda" and result.precision == precision
    assert result.image.device.type == "cpu" and result.image.dtype == torch.float32 and result.image.shape == (3, 96, 128)
    first, last = result.history[0], result.history[-1]
    assert first["content"] == 0.0 and first["style"] / last["style"] >= 10.0, (first, last)
    assert_quality_criterion(result.image, tubingen, starry, 128, result.weights_id)


def test_a_batch_equals_each_item_alone_on_the_gpu(cuda_net, tubingen, starry):
    """As tests/unit/test_engine_stylize.py's test on the CPU, with its bounds (fp32, 4 L-BFGS iterations:
    every total within 0.2 %, mean pixel difference <= 2e-3): on CUDA the batch and the lone item may
    run different cuDNN algorithms (the autotuner picks per shape; TF32 in fp32), which round differently,
    so the CPU test's first-iteration bound (1e-5, ``_assert_same_run``) is not asked for here."""
    shipwreck = images.load_image(sample_image("shipwreck.jpg")).resize(tubingen.size)
    params = StyleParams(size=64, iterations=4, weights=WEIGHTS, device="cuda", precision="fp32")
    jobs = [Job(tubingen, starry, params), Job(shipwreck, starry, params.with_overrides(init="noise", seed=3))]
    together = stylize_batch(jobs, network=cuda_net)
    for i, job in enumerate(jobs):
        alone = stylize(job.content, job.style, job.params, network=cuda_net)
        assert together[i].extra.get("batch_size") == 2 and len(together[i].history) == len(alone.history) == 4
        for b_row, a_row in zip(together[i].history, alone.history, strict=True):
            assert b_row["total"] == pytest.approx(a_row["total"], rel=2e-3), (i, b_row["iteration"])
        assert float((together[i].image - alone.image).abs().mean()) <= 2e-3, i


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=NEEDS_BF16)])
def test_the_item_estimate_is_what_a_gpu_run_keeps_within_20_percent_above(cuda_net, tubingen, starry, precision):
    """The automatic batch size on a GPU is 70 % of free memory over ``estimate_item_bytes``: measured
    here as tests/unit/test_memory_estimate.py does on the CPU (a batch of two less one of one), but
    by the caching allocator (``peak_bytes`` runs each batch once first: cuDNN's search for a new shape
    is not what a run keeps), at 256 px."""
    params = StyleParams(size=256, iterations=3, weights=WEIGHTS, device="cuda", precision=precision, tolerance=0)
    stylize_batch([Job(tubingen, starry, params.model_copy(update={"iterations": 1}))], network=cuda_net)  # layout chosen, trunk copies made
    peak = {b: execution.peak_bytes(lambda b=b: stylize_batch([Job(tubingen, starry, params)] * b, network=cuda_net), CUDA) for b in (1, 2)}
    per_item = peak[2] - peak[1]
    width, height = images.fitted_size(*tubingen.size, 256)
    estimate = estimate_item_bytes(height, width, params, precision)
    assert per_item > 0
    assert per_item <= estimate <= 1.2 * per_item, (estimate / 1e6, per_item / 1e6)


def test_the_history_products_are_measured_among_the_gpu_ways_and_equal_the_plain_products():
    """Sums of 100,000 products of unit normals (entries of about 300): within float32's rounding of
    such sums in another order (2e-3 seen on the CPU; a wrong product is off by hundreds)."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    history = torch.randn(8, 100_000, device=CUDA, generator=g)
    rows, coefficients = torch.randn(3, 100_000, device=CUDA, generator=g), torch.randn(1, 8, device=CUDA, generator=g)
    assert optim.inner_ways(history) == ["rows_first", "history_first"]  # oneDNN's product is a CPU operator
    assert optim.combine_ways(history) == ["mm", "chunked"]
    ways = optim.measure_products(history)
    assert ways.inner in optim.inner_ways(history) and ways.combine in optim.combine_ways(history)
    for way in optim.inner_ways(history):
        torch.testing.assert_close(optim.inner_products(rows, history, way), rows @ history.T, rtol=1e-4, atol=0.05)
    for combined in optim.combine_ways(history):
        out = torch.empty(1, 100_000, device=CUDA)
        optim.combine(coefficients, history, out, combined)
        torch.testing.assert_close(out, coefficients @ history, rtol=1e-4, atol=1e-3)


def test_the_flow_runs_on_the_gpu_and_batches_same_size_rows(prefect_server, tmp_path):
    from flows.stylize_manifest import stylize_manifest

    manifest = tmp_path / "gpu.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "content_uri", "style_uri"])
        for style in ("starry_night.jpg", "shipwreck.jpg"):
            writer.writerow([Path(style).stem, str(sample_image("tubingen.jpg")), str(sample_image(style))])
    output = str(tmp_path / "out")
    defaults = StyleParams(size=64, iterations=20, weights=WEIGHTS, device="cuda")
    summary = stylize_manifest(manifest_uri=str(manifest), output_uri=output, defaults=defaults, allow_local_paths=True, return_state=True).result()
    assert summary["counts"]["succeeded"] == 2, summary["counts"]
    for item in sorted(Path(output, "items").iterdir()):
        meta = json.loads(storage.read_bytes(str(item / "meta.json")))
        assert torch.device(meta["device"]).type == "cuda" and meta["precision"] == ("bf16" if BF16 else "fp32"), meta
        assert meta["batch_size"] == 2, meta  # both rows 64x48 with the same parameters: one optimisation
