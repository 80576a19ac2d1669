"""Time to quality: the default stopping rule, and coarse-to-fine, against a plain single-scale run.

    .venv/bin/python benchmarks/multiscale.py                 # 128 and 256 px, the four sample pairs
    .venv/bin/python benchmarks/multiscale.py --sizes 128 --pairs tubingen-starry --schedules all
    .venv/bin/python benchmarks/multiscale.py --sizes 512 --json benchmarks/results/multiscale-gpu.json

The target is the quality a single-scale run of the default iterations (300,
no early stopping) reaches, judged by a measure the optimisation does not see
(``nst_core.quality``: style and content distances under a VGG-19 with other
random weights), per sample pair: the distances of that run's output image.
For each schedule and pair the benchmark records

* the iterations and the optimisation's wall time at the first checkpoint
  (every 10 iterations) where both distances of the current image are within
  2 % of the target (judging time left out): how soon the schedule *has* the
  quality;
* the iterations it ran (its stopping rule) and its output's distances
  against the target: whether it *ends* with the quality, and at what cost.

A stopping rule is good when every pair ends within 2 % of its target at both
sizes, in as few iterations as possible. The per-size summary line gives the
iterations and seconds, summed over the pairs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nst_samples  # noqa: E402
from nst_core import images, quality  # noqa: E402
from nst_core.engine import IterationInfo, stop_iteration, stylize  # noqa: E402
from nst_core.network import load_network, resolve_device  # noqa: E402
from nst_core.params import StyleParams  # noqa: E402

WEIGHTS = "random:0"
SAMPLES = nst_samples.folder()
MARGIN = 1.02
REFERENCE = "single scale, 300 it"

SCHEDULES: dict[str, dict[str, object]] = {
    REFERENCE: {"tolerance": 0.0},
    "single scale, defaults": {},
    "0.5|1, 150|300 it": {"scales": (0.5, 1.0), "scale_iterations": (150, 300)},
    "0.25|0.5|1, 150|150|300 it": {"scales": (0.25, 0.5, 1.0), "scale_iterations": (150, 150, 300)},
}
DEFAULT_SCHEDULES = (REFERENCE, "single scale, defaults")


def sample_pairs() -> dict[str, tuple[str, str]]:
    """The sample manifest's pairs: id -> (content file, style file)."""
    with open(SAMPLES / "samples.csv", newline="") as f:
        return {row["id"]: (row["content_uri"], row["style_uri"]) for row in csv.DictReader(f)}


def trace(params: StyleParams, pair: tuple[str, str], size: int, device: torch.device) -> dict[str, object]:
    """One run: (seconds, iteration, style, content) at every full-size checkpoint, and the output's distances."""
    content, style = images.load_image(SAMPLES / pair[0]), images.load_image(SAMPLES / pair[1])
    photo = images.resized_tensor(content, long_side=size)
    style_t = images.resized_tensor(style, long_side=size)
    judge = quality.judge_network(WEIGHTS, device)
    points: list[tuple[float, int, float, float]] = []
    judging = [0.0]
    start = [0.0]

    def distances(image: torch.Tensor) -> tuple[float, float]:
        image = image.detach().clamp(0, 1).cpu()
        return quality.style_distance(judge, image, style_t), quality.content_distance(judge, image, photo)

    def on_progress(info: IterationInfo) -> None:
        t0 = time.perf_counter()
        if tuple(info.image.shape[-2:]) != tuple(photo.shape[-2:]):
            return  # a coarse stage
        elapsed = t0 - start[0] - judging[0]
        points.append((elapsed, info.iteration, *distances(info.image[0])))
        judging[0] += time.perf_counter() - t0

    load_network(WEIGHTS, device=device)
    start[0] = time.perf_counter()
    result = stylize(content, style, params, callback=on_progress)
    total = time.perf_counter() - start[0] - judging[0]
    style_d, content_d = distances(result.image)
    return {
        "total_s": total, "iterations": result.iterations, "stop_reason": result.stop_reason,
        "style_distance": style_d, "content_distance": content_d, "points": points,
        "totals": [row["total"] for row in result.history],
    }  # fmt: skip


def within(style_d: float, content_d: float, target: dict[str, float]) -> bool:
    """Both distances at most ``MARGIN`` times the target's."""
    return style_d <= MARGIN * target["style_distance"] and content_d <= MARGIN * target["content_distance"]


def score(run: dict[str, object], target: dict[str, float]) -> dict[str, object]:
    """A run against its pair's target: when it first had the quality, and whether its output has it."""
    hit = next((p for p in run["points"] if within(p[2], p[3], target)), None)  # type: ignore[attr-defined]
    return {
        **{k: v for k, v in run.items() if k not in ("points", "totals")},
        "style_ratio": run["style_distance"] / target["style_distance"],  # type: ignore[operator]
        "content_ratio": run["content_distance"] / target["content_distance"],  # type: ignore[operator]
        "ends_at_target": within(run["style_distance"], run["content_distance"], target),  # type: ignore[arg-type]
        "iterations_to_quality": hit[1] if hit else None,
        "seconds_to_quality": hit[0] if hit else None,
        "checkpoints": run["points"],
    }


def sweep(reference: dict[str, object], target: dict[str, float], tolerances: list[float]) -> dict[str, dict[str, object]]:
    """Where each tolerance would stop the reference run (:func:`nst_core.engine.stop_iteration`), and its quality there.

    Exact for the iterations and seconds (a lone item's early-stopped run is the start of its full run
    on the CPU); the distances are those of the checkpoint's current image, which the returned image
    (the lowest loss so far) can differ from by an uphill step.
    """
    rows = {}
    for tolerance in tolerances:
        k = stop_iteration(reference["totals"], tolerance)  # type: ignore[arg-type]
        point = next(p for p in reference["points"] if p[1] == k)  # type: ignore[attr-defined]
        rows[f"{tolerance:g}"] = {
            "iterations": k, "seconds": point[0],
            "style_ratio": point[2] / target["style_distance"], "content_ratio": point[3] / target["content_distance"],
            "ends_at_target": within(point[2], point[3], target),
        }  # fmt: skip
    return rows


def summarise(rows: dict[str, dict[str, object]]) -> dict[str, object]:
    """Over the pairs: iterations and seconds run and to quality (sums), the worst ratios, all at target?"""
    runs = list(rows.values())
    reached = [r for r in runs if r["iterations_to_quality"] is not None]
    return {
        "iterations": sum(r["iterations"] for r in runs),  # type: ignore[misc]
        "run_s": sum(r["total_s"] for r in runs),  # type: ignore[misc]
        "worst_style_ratio": max(r["style_ratio"] for r in runs),  # type: ignore[type-var]
        "worst_content_ratio": max(r["content_ratio"] for r in runs),  # type: ignore[type-var]
        "all_end_at_target": all(r["ends_at_target"] for r in runs),
        "iterations_to_quality": sum(r["iterations_to_quality"] for r in reached) if len(reached) == len(runs) else None,  # type: ignore[misc]
        "seconds_to_quality": sum(r["seconds_to_quality"] for r in reached) if len(reached) == len(runs) else None,  # type: ignore[misc]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--pairs", default="all", help="sample pair ids (nst_samples/samples.csv), comma-separated, or 'all'")
    parser.add_argument(
        "--schedules", default="default", help="'default' (the 300-iteration reference and the defaults), 'all', or indices into SCHEDULES (0,2)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tolerances", default="0.002,0.003,0.005,0.0075,0.01,0.02", help="tolerances whose stop is read off the reference runs (empty: none)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pairs = sample_pairs()
    if args.pairs != "all":
        pairs = {k: pairs[k] for k in args.pairs.split(",")}
    tolerances = [float(t) for t in args.tolerances.split(",") if t]
    names = {"all": list(SCHEDULES), "default": list(DEFAULT_SCHEDULES)}.get(args.schedules) or [list(SCHEDULES)[int(k)] for k in args.schedules.split(",")]
    if names[0] != REFERENCE:
        parser.error("the reference schedule (0) must come first: it sets the target")
    defaults = StyleParams()
    report: dict[str, object] = {
        "device": str(device), "torch_threads": torch.get_num_threads(), "pairs": list(pairs),
        "defaults": {"tolerance": defaults.tolerance, "iterations": defaults.iterations, "optimizer": defaults.optimizer},
        "load_average_start": os.getloadavg(), "sizes": {},
    }  # fmt: skip
    for size in [int(s) for s in args.sizes.split(",")]:
        by_schedule: dict[str, dict[str, dict[str, object]]] = {name: {} for name in names}
        swept: dict[str, dict[str, dict[str, object]]] = {}
        for pair_id, pair in pairs.items():
            target: dict[str, float] = {}
            for name in names:  # the reference first: it sets the pair's target
                params = StyleParams(size=size, weights=WEIGHTS, device=str(device), progress_every=10, **SCHEDULES[name])  # type: ignore[arg-type]
                run = trace(params, pair, size, device)
                if not target:
                    target = {"style_distance": run["style_distance"], "content_distance": run["content_distance"]}  # type: ignore[dict-item]
                    swept[pair_id] = sweep(run, target, tolerances)
                by_schedule[name][pair_id] = score(run, target)
        print(
            f"\n{size} px on {device} ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}): target = {REFERENCE}'s output, +{MARGIN - 1:.0%}"
        )
        print(f"{'schedule / pair':<58} {'its':>5} {'run s':>7} {'style':>7} {'content':>8} {'ends ok':>8} {'its to q':>9} {'s to q':>7}")
        sizes_report: dict[str, object] = {}
        for name, rows in by_schedule.items():
            summary = summarise(rows)
            sizes_report[name] = {"summary": summary, "pairs": rows}
            for pair_id, r in rows.items():
                itq, stq = r["iterations_to_quality"], r["seconds_to_quality"]
                print(
                    f"  {name[:30] + ' / ' + pair_id:<56} {r['iterations']:>5} {r['total_s']:>7.1f} {r['style_ratio']:>7.3f} "
                    f"{r['content_ratio']:>8.3f} {'yes' if r['ends_at_target'] else 'NO':>8} {itq if itq else '-':>9} {f'{stq:.1f}' if stq else '-':>7}"
                )  # fmt: skip
            itq, stq = summary["iterations_to_quality"], summary["seconds_to_quality"]
            print(
                f"{name + ' (all pairs)':<58} {summary['iterations']:>5} {summary['run_s']:>7.1f} {summary['worst_style_ratio']:>7.3f} "
                f"{summary['worst_content_ratio']:>8.3f} {'yes' if summary['all_end_at_target'] else 'NO':>8} {itq if itq else '-':>9} {f'{stq:.1f}' if stq else '-':>7}"
            )  # fmt: skip
        if tolerances:
            print(f"\nthe stopping rule read off the reference runs ({REFERENCE}): iterations per pair, worst style and content ratio")
            for t in [f"{t:g}" for t in tolerances]:
                rows = [swept[p][t] for p in pairs]
                ok = "all at target" if all(r["ends_at_target"] for r in rows) else "NOT all at target"
                print(
                    f"  tolerance {t:<7} iterations {[r['iterations'] for r in rows]} (sum {sum(r['iterations'] for r in rows)}, "
                    f"{sum(r['seconds'] for r in rows):.1f} s)  style {max(r['style_ratio'] for r in rows):.3f}  content {max(r['content_ratio'] for r in rows):.3f}  {ok}"
                )  # fmt: skip
            sizes_report["tolerance sweep"] = swept
        report["sizes"][str(size)] = sizes_report  # type: ignore[index]
    report["load_average_end"] = os.getloadavg()
    print("\nstyle, content: the output's judged distance / the target's (worst pair on summary lines); its/s to q: first checkpoint within the target")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
