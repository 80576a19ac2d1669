"""Time to quality: coarse-to-fine and early stopping against a plain single-scale run.

    .venv/bin/python benchmarks/multiscale.py                 # 128 and 256 px on the current device
    .venv/bin/python benchmarks/multiscale.py --sizes 512 --json benchmarks/results/multiscale-gpu.json

The target is the quality a single-scale run of the default iterations (300,
no early stopping) reaches, judged by a measure the optimisation does not see
(``nst_core.quality``: style and content distances under a VGG-19 with other
random weights). For each schedule the benchmark records the optimisation's
wall time at the first checkpoint (every 10 iterations) where both distances
are within 2% of the target, with the judging time itself left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nst_samples  # noqa: E402
from nst_core import images, quality  # noqa: E402
from nst_core.engine import IterationInfo, stylize  # noqa: E402
from nst_core.network import load_network, resolve_device  # noqa: E402
from nst_core.params import StyleParams  # noqa: E402

WEIGHTS = "random:0"
SAMPLES = nst_samples.folder()
MARGIN = 1.02

SCHEDULES = {
    "single scale, 300 it": {"tolerance": 0.0},
    "single scale, early stop": {},
    "0.5|1, 150|300 it, early stop": {"scales": (0.5, 1.0), "scale_iterations": (150, 300)},
    "0.25|0.5|1, 150|150|300 it, early stop": {"scales": (0.25, 0.5, 1.0), "scale_iterations": (150, 150, 300)},
}


def trace(params: StyleParams, size: int, device: torch.device) -> tuple[list[tuple[float, int, float, float]], float]:
    """(optimisation seconds, iteration, style distance, content distance) at every checkpoint at full size."""
    content, style = images.load_image(SAMPLES / "tubingen.jpg"), images.load_image(SAMPLES / "starry_night.jpg")
    photo = images.resized_tensor(content, long_side=size)
    style_t = images.resized_tensor(style, long_side=size)
    judge = quality.judge_network(WEIGHTS, device)
    points: list[tuple[float, int, float, float]] = []
    judging = [0.0]
    start = [0.0]

    def on_progress(info: IterationInfo) -> None:
        t0 = time.perf_counter()
        if tuple(info.image.shape[-2:]) != tuple(photo.shape[-2:]):
            return  # a coarse stage
        elapsed = t0 - start[0] - judging[0]
        image = info.image[0].detach().clamp(0, 1).cpu()
        sd = quality.style_distance(judge, image, style_t)
        cd = quality.content_distance(judge, image, photo)
        judging[0] += time.perf_counter() - t0
        points.append((elapsed, info.iteration, sd, cd))

    load_network(WEIGHTS, device=device)
    start[0] = time.perf_counter()
    stylize(content, style, params, callback=on_progress)
    return points, time.perf_counter() - start[0] - judging[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    report: dict[str, object] = {"device": str(device), "torch_threads": torch.get_num_threads(), "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        rows = {}
        target = None
        for name, overrides in SCHEDULES.items():
            params = StyleParams(size=size, weights=WEIGHTS, device=str(device), progress_every=10, **overrides)
            points, total = trace(params, size, device)
            if target is None:  # the first schedule is the reference
                target = (points[-1][2], points[-1][3])
            hit = next((p for p in points if p[2] <= MARGIN * target[0] and p[3] <= MARGIN * target[1]), None)
            rows[name] = {
                "total_s": total, "iterations": points[-1][1], "style_distance": points[-1][2],
                "content_distance": points[-1][3], "time_to_quality_s": hit[0] if hit else None,
            }  # fmt: skip
        base = rows[next(iter(SCHEDULES))]["time_to_quality_s"]
        print(f"\n{size} px on {device}: target style distance {target[0]:.5f}, content distance {target[1]:.4f} (+{MARGIN - 1:.0%})")
        print(f"{'schedule':<42} {'run s':>7} {'its':>5} {'style':>9} {'content':>8} {'to quality s':>13} {'speed-up':>9}")
        for name, r in rows.items():
            ttq = r["time_to_quality_s"]
            speed = f"{base / ttq:.2f}x" if ttq else "never"
            ttq_s = f"{ttq:.1f}" if ttq else "-"
            print(f"{name:<42} {r['total_s']:>7.1f} {r['iterations']:>5} {r['style_distance']:>9.5f} {r['content_distance']:>8.4f} {ttq_s:>13} {speed:>9}")
        report["sizes"][str(size)] = rows  # type: ignore[index]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
