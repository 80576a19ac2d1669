"""Choosing between ways of computing the same thing by timing them on the device at hand.

Used for the trunk's layout (:mod:`nst_core.execution`) and the L-BFGS history's products
(:mod:`nst_core.optim`): which way is fastest depends on the machine (its BLAS, its instructions),
not on the code, so it is measured once and kept, never assumed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

MARGIN = 0.05
"""Another candidate replaces the first (the default) only when it is this much faster: on a machine
where two candidates are equal, noise would otherwise pick either from run to run."""

K = TypeVar("K")


def fastest(timings: Mapping[K, float], margin: float = MARGIN) -> K:
    """The candidate to use given seconds per pass (in the mapping's order, the first the default).

    The fastest, unless it beats the first by less than ``margin`` (then the first).

    Raises:
        ValueError: nothing was timed.
    """
    if not timings:
        raise ValueError("no candidates were timed")
    default = next(iter(timings))
    best = min(timings, key=lambda k: timings[k])
    return best if timings[best] < (1.0 - margin) * timings[default] else default


def time_in_turns(ways: Mapping[K, Callable[[], object]], repeats: int, device: torch.device) -> dict[K, float]:
    """Seconds per call of each of ``ways``: the fastest of ``repeats`` calls, after an untimed round.

    The ways take turns, one call each per round, so a load that comes and goes weighs on all alike
    (see :data:`nst_core.execution.MEASURE_REPEATS`); the first round warms caches and kernels.
    """
    best = dict.fromkeys(ways, math.inf)
    for round_ in range(repeats + 1):
        for way, run in ways.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            if round_ > 0:
                best[way] = min(best[way], time.perf_counter() - start)
    return best


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
