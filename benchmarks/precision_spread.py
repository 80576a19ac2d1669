"""How far bf16 and fp32 judged quality differ, over several pairs and weight seeds.

The bound of ``tests/test_engine_stylize.py::test_bf16_matches_fp32_in_judged_quality`` comes from
this spread (the optimisation's own spread: one pair and one seed is not a measurement). For each
(content, style, seed) it runs the default optimisation at ``--size`` in fp32 and in bf16 and prints
the ratio bf16/fp32 of both judged distances (``nst_core.quality``), then the largest deviation.

    .venv/bin/python benchmarks/precision_spread.py --size 128 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nst_samples  # noqa: E402
from nst_core import images, quality, stylize  # noqa: E402
from nst_core.network import load_network  # noqa: E402
from nst_core.params import StyleParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    rows = []
    for content_name, style_name in itertools.product(nst_samples.CONTENTS, nst_samples.STYLES):
        content = images.load_image(nst_samples.path(content_name))
        style = images.load_image(nst_samples.path(style_name))
        photo = images.resized_tensor(content, long_side=args.size)
        painting = images.resized_tensor(style, long_side=args.size)
        for seed in args.seeds:
            weights = f"random:{seed}"
            network = load_network(weights, device="cpu")
            judged = {}
            for precision in ("fp32", "bf16"):
                params = StyleParams(size=args.size, weights=weights, device="cpu", precision=precision)
                result = stylize(content, style, params, network=network)
                judged[precision] = quality.measure(result.image, photo, painting, result.weights_id)
            row = {
                "content": content_name, "style": style_name, "seed": seed,
                "style_ratio": judged["bf16"].style_distance / judged["fp32"].style_distance,
                "content_ratio": judged["bf16"].content_distance / judged["fp32"].content_distance,
            }  # fmt: skip
            rows.append(row)
            print(f"{content_name:>22} x {style_name:<17} seed {seed}: bf16/fp32 style {row['style_ratio']:.3f}, content {row['content_ratio']:.3f}", flush=True)
    worst = {k: max(abs(r[k] - 1) for r in rows) for k in ("style_ratio", "content_ratio")}
    print(f"largest deviation from 1: style {worst['style_ratio']:.3f}, content {worst['content_ratio']:.3f} over {len(rows)} runs")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "machine": platform.processor() or platform.machine(), "rows": rows, "worst": worst}, indent=2))


if __name__ == "__main__":
    main()
