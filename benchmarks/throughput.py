"""Images per hour: the real flow against the plain one-image-at-a-time reference loop.

    .venv/bin/python benchmarks/throughput.py                      # 2 contents x 2 styles at 128 px, 300 iterations
    .venv/bin/python benchmarks/throughput.py --precision fp32     # the flow without bf16
    .venv/bin/python benchmarks/throughput.py --size 512 --copies 16 --json benchmarks/results/throughput-gpu.json

* flow: ``stylize_manifest`` on the sample manifest (local paths, Prefect's
  ephemeral server; server start-up not counted), default parameters except
  ``size`` and ``weights=random:0`` (and ``precision`` when given): style
  targets cached, early stopping (``tolerance``), batching where sizes match,
  bf16 convolutions where the device has them natively (``precision=auto``).
  ``--copies N`` runs each sample row N times (ids ``<id>-<k>``, ``seed=k``: N distinct items
  each, the same picture from the content image): four images cannot keep a GPU busy, and a
  flow's fixed costs (planning, the report) would be most of its wall time.
* reference: ``benchmarks/engine.py``'s tutorial-style loop, one image at a
  time, network and targets rebuilt per image, ``torch.optim.LBFGS`` for the
  same number of iterations, optimising against the same ``random:0`` VGG-19
  weights (loaded per image, as the tutorial loads its weights).

Each side runs in a fresh Python process, one after the other, so neither
inherits the other's threads, caches or OpenMP state.

Quality is judged by a measure neither optimisation sees (``nst_core.quality``:
style and content distances under a VGG-19 with other random weights), as the
mean over the four pairs; "equal or better" means both distances at most 2%
above the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import engine as engine_bench  # noqa: E402  (benchmarks/engine.py: the reference loop)

import nst_samples  # noqa: E402
from nst_core import images, quality, storage  # noqa: E402
from nst_core.layers import LAYER_NAMES  # noqa: E402
from nst_core.network import load_network, resolve_device, resolve_precision  # noqa: E402
from nst_core.params import StyleParams  # noqa: E402

WEIGHTS = "random:0"
SAMPLES = nst_samples.folder()
PAIRS = [(c, s) for c in ("tubingen.jpg", "hoovertowernight.jpg") for s in ("starry_night.jpg", "shipwreck.jpg")]
QUALITY_MARGIN = 1.02


def _use_our_weights_in_reference() -> None:
    """Make the reference's ``vgg19()`` carry the same random:0 weights the flow optimises against."""
    import torchvision.models as tvm

    trunk = load_network(WEIGHTS, device="cpu").features.layers
    state = {f"{LAYER_NAMES.index(k.split('.')[0])}.{k.split('.')[1]}": v for k, v in trunk.state_dict().items()}
    original = tvm.vgg19

    def vgg19_with_weights(*args, **kwargs):
        model = original(weights=None)
        model.features.load_state_dict(state)
        return model

    tvm.vgg19 = vgg19_with_weights


def judge(output: torch.Tensor, content_name: str, style_name: str, size: int, device: torch.device) -> dict[str, float]:
    content = images.load_image(SAMPLES / content_name)
    style = images.load_image(SAMPLES / style_name)
    photo = images.resized_tensor(content, long_side=size)
    style_t = images.resized_tensor(style, long_side=size)
    q = quality.measure(output.cpu(), photo, style_t, WEIGHTS, device)
    return {"style_distance": q.style_distance, "content_distance": q.content_distance}


def run_reference(size: int, iterations: int, device: torch.device) -> dict[str, object]:
    _use_our_weights_in_reference()
    scores, start = [], time.perf_counter()
    for content_name, style_name in PAIRS:
        content, style = images.load_image(SAMPLES / content_name), images.load_image(SAMPLES / style_name)
        out, _ = engine_bench.reference_stylize(content, style, size, iterations, device, [])
        engine_bench._sync(device)
        scores.append(judge(out[0], content_name, style_name, size, device))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "images_per_hour": len(PAIRS) * 3600 / wall, **_mean(scores)}


def copied_manifest(folder: Path, copies: int) -> Path:
    """The sample manifest with each row ``copies`` times (``<id>-<k>``, ``seed=k``), absolute paths, in ``folder``."""
    import csv

    with open(REPO / "manifests" / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = folder / "samples-copied.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "seed"])
        writer.writeheader()
        for k in range(copies):
            for row in rows:
                paths = {col: str((REPO / "manifests" / row[col]).resolve()) for col in ("content_uri", "style_uri")}
                writer.writerow({**row, **paths, "id": f"{row['id']}-{k}", "seed": k})
    return out


def run_flow(size: int, iterations: int, device: torch.device, output: str, precision: str = "auto", copies: int = 1) -> dict[str, object]:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.stylize_manifest import stylize_manifest

    defaults = StyleParams(size=size, iterations=iterations, weights=WEIGHTS, device=str(device), precision=precision)
    manifest = REPO / "manifests" / "samples.csv" if copies == 1 else copied_manifest(Path(output), copies)
    state = stylize_manifest(
        manifest_uri=str(manifest), output_uri=str(Path(output) / "out"), defaults=defaults,
        allow_local_paths=True, return_state=True,
    )  # fmt: skip
    summary = state.result()
    import pandas as pd

    results = pd.read_csv(summary["results_csv"])
    scores, iterations_run = [], []
    for _, row in results.iterrows():
        out = images.to_tensor(images.load_image(storage.read_bytes(row["output_uri"])))
        scores.append(judge(out, Path(row["content_uri"]).name, Path(row["style_uri"]).name, size, device))
        iterations_run.append(int(row["iterations"]))
    wall = summary["wall_time_s"]
    return {
        "wall_s": wall, "images_per_hour": len(results) * 3600 / wall, "iterations_run": iterations_run,
        "counts": summary["counts"], "precision": precision, "items": len(results), **_mean(scores),
    }  # fmt: skip


def _mean(scores: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}


def run_side(side: str, args: argparse.Namespace) -> dict[str, object]:
    """One side of the comparison in a fresh Python process (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        command = [sys.executable, __file__, "--side", side, "--side-json", str(out), "--size", str(args.size),
                   "--iterations", str(args.iterations), "--device", args.device, "--precision", args.precision,
                   "--copies", str(args.copies)]  # fmt: skip
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=StyleParams().iterations)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="the flow's precision parameter")
    parser.add_argument("--copies", type=int, default=1, help="the flow runs each sample row this many times (distinct items; see above)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--side", choices=("flow", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--side-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.side is not None:
        if args.side == "flow":
            with tempfile.TemporaryDirectory() as tmp:
                figures = run_flow(args.size, args.iterations, device, tmp, args.precision, args.copies)
        else:
            figures = run_reference(args.size, args.iterations, device)
        Path(args.side_json).write_text(json.dumps(figures))
        return 0
    flow = run_side("flow", args)
    reference = run_side("reference", args)
    ratio = flow["images_per_hour"] / reference["images_per_hour"]
    equal_or_better = all(flow[k] <= QUALITY_MARGIN * reference[k] for k in ("style_distance", "content_distance"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"throughput at {args.size} px, {args.iterations} iterations (max), {len(PAIRS)} pairs x {args.copies} copies in the flow, device {device} ({name}), torch threads {torch.get_num_threads()}")
    print(f"flow precision: {args.precision} -> {resolve_precision(args.precision, device)}; reference: fp32")
    print(f"{'':<10} {'images/h':>10} {'wall s':>8} {'style dist':>11} {'content dist':>13}")
    for label, r in (("flow", flow), ("reference", reference)):
        print(f"{label:<10} {r['images_per_hour']:>10.1f} {r['wall_s']:>8.1f} {r['style_distance']:>11.5f} {r['content_distance']:>13.4f}")
    print(f"ratio flow/reference: {ratio:.2f}x; quality equal or better (within {QUALITY_MARGIN - 1:.0%}): {equal_or_better}")
    print(f"flow iterations per item (early stopping): {flow['iterations_run'] if args.copies == 1 else sorted(flow['iterations_run'])}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "size": args.size, "iterations": args.iterations, "device": str(device), "device_name": name,
            "torch_threads": torch.get_num_threads(), "precision": args.precision, "copies": args.copies, "torch": torch.__version__,
            "precision_resolved": resolve_precision(args.precision, device), "flow": flow, "reference": reference,
            "ratio": ratio, "quality_equal_or_better": equal_or_better,
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
