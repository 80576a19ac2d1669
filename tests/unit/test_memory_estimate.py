"""The memory an item needs, as estimated for automatic batch sizes, against what a run keeps.

``estimate_item_bytes`` sizes the automatic batch on a GPU (70 % of free memory over it): too high and
a GPU runs half empty, too low and batches run out of memory and are halved. What a run keeps is
counted here on the CPU (the profiler's memory timeline, ``execution.peak_bytes``: the same tensors a
GPU would hold), per item as the peak of a batch of two less that of one, so that what a batch holds
once (the network, the style image's pass) is left out. Allocation sizes do not depend on timing: the
count is the same from run to run, and the same in either layout.
"""

from __future__ import annotations

import pytest
import torch

from nst_core import execution, images
from nst_core.engine import Job, estimate_item_bytes, stylize_batch
from nst_core.params import StyleParams


@pytest.mark.parametrize(("size", "precision"), [(64, "fp32"), (128, "fp32"), (48, "bf16")])
def test_the_item_estimate_is_what_a_run_keeps_within_20_percent_above(monkeypatch, net, tubingen, starry, size, precision):
    monkeypatch.setattr(execution, "time_pass", lambda *args, **kwargs: 1.0)  # the default layout, no timing
    execution.clear_choices()
    params = StyleParams(size=size, iterations=3, weights="random:0", precision=precision, tolerance=0)
    try:
        stylize_batch([Job(tubingen, starry, params.model_copy(update={"iterations": 1}))], network=net)  # the trunk's copies made once
        peak = {b: execution.peak_bytes(lambda b=b: stylize_batch([Job(tubingen, starry, params)] * b, network=net), net.device) for b in (1, 2)}
    finally:
        execution.clear_choices()
    per_item = peak[2] - peak[1]
    width, height = images.fitted_size(*tubingen.size, size)
    estimate = estimate_item_bytes(height, width, params, precision)
    assert per_item > 0
    assert per_item <= estimate <= 1.2 * per_item, (estimate / 1e6, per_item / 1e6)


def test_bf16_items_are_estimated_smaller_and_adam_smaller_than_lbfgs():
    params = StyleParams()
    assert estimate_item_bytes(384, 512, params, "bf16") < estimate_item_bytes(384, 512, params, "fp32")
    assert estimate_item_bytes(384, 512, params.model_copy(update={"optimizer": "adam"})) < estimate_item_bytes(384, 512, params)


def test_peak_bytes_counts_what_is_alive_at_the_peak_only():
    def run() -> None:
        kept = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB, alive to the end
        for _ in range(3):
            torch.empty(2_000_000, dtype=torch.float32).fill_(1.0)  # 8 MB at a time, freed each turn
        kept.fill_(0.0)

    assert 12_000_000 <= execution.peak_bytes(run, torch.device("cpu")) < 13_000_000
