"""Seconds per iteration: this engine against a plain, tutorial-style reference loop.

    .venv/bin/python benchmarks/engine.py                       # 64/128/256 px (+512 on CUDA)
    .venv/bin/python benchmarks/engine.py --sizes 128,256 --skip-reference --json bench.json   # engine vs trunk only
    .venv/bin/python benchmarks/engine.py --threads 1           # one core (steadier on a shared machine)
    .venv/bin/python benchmarks/engine.py --rounds 3            # trunk and engine timed three times in turn, the fastest of each
    .venv/bin/python benchmarks/engine.py --quality             # also the quality criterion at 256 px
    .venv/bin/python benchmarks/engine.py --precision fp32      # the engine without bf16 convolutions

Both sides do the same work per iteration: one forward pass of VGG-19 up to
relu5_1 (content relu4_2, style relu1_1..relu5_1) and one backward pass, on one
content image stylised with one style image, random weights (no download).

* engine: ``nst_core.stylize`` with the network cached (loaded once, before
  timing) and the default parameters except size and iterations.
* reference: what a first implementation following the PyTorch tutorial looks
  like. Per image it rebuilds torchvision's ``vgg19().features``, computes the
  style and content targets, inserts ``nn.Module`` loss layers into a new
  ``nn.Sequential`` after the chosen layers, and runs ``torch.optim.LBFGS``
  with a closure that clamps the image. One image at a time.

Columns: s/it is the time per loss evaluation (forward + backward + optimiser
step), measured between the first and the last evaluation; s/image is the whole
call for ``--reference-iterations`` evaluations on both sides, set-up included
(network build, resizing, targets). Ratios are reference / engine.

The trunk against the engine (the hardware's limit): the project's own VGG-19 trunk up to
relu5_1 alone (forward and input-gradient backward, no loss, no optimiser) in every layout and
precision (``nst_core.execution.time_pass``), against the engine's steady-state iteration (the
fastest of the last ``--steady`` evaluations of the run, as the trunk's figure is its fastest pass; with 110 evaluations the L-BFGS history is
full, as in most of a 300-iteration run). Printed: each trunk's ms and achieved TFLOP/s (2 x
multiply-adds of every conv up to relu5_1, twice: the backward computes the input gradient only,
the weights are frozen), the engine's iteration, its ratio to the fastest trunk at its precision,
the time outside the trunk (the engine's iteration minus the trunk in the layout the engine
chose), and the device's peak measured in the same run by matmul and conv microbenchmarks (bf16
and fp32, the best of them), with the fraction of it the trunk and the engine reach.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nst_samples  # noqa: E402
from nst_core import (  # noqa: E402
    execution,  # noqa: E402
    images,
    quality,
    stylize,
)
from nst_core.network import load_network, native_bf16, resolve_device, resolve_precision  # noqa: E402
from nst_core.params import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS, StyleParams  # noqa: E402

WEIGHTS = "random:0"
PRECISION = "auto"  # the engine's precision parameter (--precision)



def sample_images() -> tuple[Image.Image, Image.Image, str]:
    """tubingen.jpg and starry_night.jpg from the sample images (nst_samples), or seeded noise images."""
    folder = nst_samples.folder()
    content, style = folder / "tubingen.jpg", folder / "starry_night.jpg"
    if content.is_file() and style.is_file():
        return images.load_image(content), images.load_image(style), f"{content.name} x {style.name}"
    g = torch.Generator().manual_seed(0)
    noise = [images.to_pil(torch.rand(3, 768, 1024, generator=g)), images.to_pil(torch.rand(3, 640, 1024, generator=g))]
    return noise[0], noise[1], "seeded noise images (samples not found)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- this engine ----------------------------------------------------------------------------------


def time_engine(content: Image.Image, style: Image.Image, size: int, iterations: int, device: torch.device, steady: int = 10) -> dict[str, object]:
    # tolerance=0: exactly `iterations` evaluations (no early stop), like the reference
    params = StyleParams(size=size, iterations=iterations, weights=WEIGHTS, device=str(device), progress_every=1, tolerance=0, precision=PRECISION)
    network = load_network(WEIGHTS, pooling=params.pooling, device=device)  # cached: loaded once per process
    stamps: list[float] = []
    _sync(device)
    start = time.perf_counter()
    result = stylize(content, style, params, network=network, callback=lambda info: stamps.append(time.perf_counter()))
    _sync(device)
    total = time.perf_counter() - start
    tail = stamps[-(min(steady, len(stamps) - 1) + 1):]
    return {
        "s_per_iteration": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), "s_per_image": total, "evaluations": len(stamps),
        "s_per_iteration_steady": (tail[-1] - tail[0]) / max(len(tail) - 1, 1), "steady_evaluations": len(tail) - 1,
        "s_per_iteration_steady_min": min((b - a for a, b in itertools.pairwise(tail)), default=math.nan),
        "execution": result.execution, "precision": result.precision, "shape": [1, 3, *result.image.shape[-2:]],
    }  # fmt: skip


# --- the convolutions alone ------------------------------------------------------------------------


LAYERS = tuple(DEFAULT_STYLE_LAYERS) + tuple(DEFAULT_CONTENT_LAYERS)


def conv_flops(network, height: int, width: int) -> float:
    """FLOPs of one forward pass's convolutions up to the deepest layer the engine uses (2 per multiply-add)."""
    counted: list[float] = []

    def count(module: nn.Conv2d, _inputs: object, output: torch.Tensor) -> None:
        counted.append(2.0 * output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])

    hooks = [m.register_forward_hook(count) for m in network.features.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            network.features(torch.zeros(1, 3, height, width, device=network.device), LAYERS)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(counted)


def time_trunks(shape: list[int], device: torch.device, repeats: int = 5) -> list[dict[str, object]]:
    """The bare trunk (forward + input-gradient backward, no loss) in each layout and precision tried."""
    network = load_network(WEIGHTS, device=device)
    flops = 2 * conv_flops(network, shape[2], shape[3]) * shape[0]  # forward + the backward's input gradient
    precisions = ["fp32"] + (["bf16"] if native_bf16(device) or PRECISION == "bf16" else [])
    rows = []
    for precision in precisions:
        for layout in execution.LAYOUTS:
            seconds = execution.time_pass(network.at_precision(precision), execution.Execution(layout), shape, LAYERS, repeats)
            rows.append({"precision": precision, "layout": layout, "s_per_pass": seconds, "gflop": flops / 1e9, "tflops": flops / seconds / 1e12})
    return rows


def measure_peak(device: torch.device, repeats: int = 5) -> dict[str, float]:
    """The device's dense throughput, TFLOP/s, measured here: square matmuls and a conv of conv3_1's shape."""
    n = 4096 if device.type == "cuda" else 1024
    side = 128 if device.type == "cuda" else 64
    found: dict[str, float] = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if tag == "bf16" and not native_bf16(device):
            continue
        a, b = torch.rand(n, n, device=device, dtype=dtype), torch.rand(n, n, device=device, dtype=dtype)
        found[f"matmul_{tag}"] = 2 * n**3 / _best_time(lambda a=a, b=b: a @ b, device, repeats) / 1e12
        x = torch.rand(1, 256, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.rand(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        found[f"conv_{tag}"] = 2 * 256 * 256 * 9 * side * side / _best_time(lambda x=x, w=w: F.conv2d(x, w, padding=1), device, repeats) / 1e12
    found["peak"] = max(found.values())
    return found


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def round_ratio(engine: dict[str, object], trunks: list[dict[str, object]]) -> float:
    """One round's engine iteration over its fastest trunk at the engine's precision (the spread between rounds)."""
    fastest = min(t["s_per_pass"] for t in trunks if t["precision"] == engine["precision"])  # type: ignore[type-var]
    return float(engine["s_per_iteration_steady_min"]) / float(fastest)  # type: ignore[arg-type]


def against_trunk(engine: dict[str, object], trunks: list[dict[str, object]], peak_tflops: float) -> dict[str, object]:
    """The engine's steady iteration against the bare trunk at its precision: ratio, time outside, fraction of the peak."""
    same = [t for t in trunks if t["precision"] == engine["precision"]]
    fastest = min(same, key=lambda t: t["s_per_pass"])
    chosen = next(t for t in same if t["layout"] == str(engine["execution"]).split("|")[-1].split("+")[0])
    # The fastest of the last evaluations, as the trunk's figure is its fastest pass: on a shared
    # machine both minima approach the unloaded time, where a mean would charge the load to the engine.
    steady = float(engine["s_per_iteration_steady_min"])  # type: ignore[arg-type]
    return {
        "fastest_trunk_layout": fastest["layout"], "ratio_to_fastest_trunk": steady / fastest["s_per_pass"],
        "outside_trunk_s": steady - chosen["s_per_pass"], "outside_trunk_fraction": (steady - chosen["s_per_pass"]) / steady,
        "engine_fraction_of_peak": chosen["gflop"] * 1e9 / steady / 1e12 / peak_tflops,
    }  # fmt: skip


# --- the reference: tutorial style, written out plainly ----------------------------------------------


class Normalize(nn.Module):
    def __init__(self, device: torch.device):
        super().__init__()
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(-1, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(-1, 1, 1)

    def forward(self, x):
        return (x - self.mean) / self.std


class ContentLoss(nn.Module):
    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target.detach()
        self.loss = torch.tensor(0.0)

    def forward(self, x):
        self.loss = F.mse_loss(x, self.target)
        return x


def gram(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    f = x.view(b * c, h * w)
    return (f @ f.t()) / (b * c * h * w)


class StyleLoss(nn.Module):
    def __init__(self, target_features: torch.Tensor):
        super().__init__()
        self.target = gram(target_features).detach()
        self.loss = torch.tensor(0.0)

    def forward(self, x):
        self.loss = F.mse_loss(gram(x), self.target)
        return x


def build_model(device, style_img, content_img, content_layers, style_layers):
    """A new VGG-19 and a new Sequential with loss modules inserted: once per image."""
    from torchvision.models import vgg19

    cnn = vgg19(weights=None).features.to(device).eval()
    model = nn.Sequential(Normalize(device))
    content_losses, style_losses = [], []
    block, index = 1, 0
    for layer in cnn.children():
        if isinstance(layer, nn.Conv2d):
            index += 1
            name = f"conv{block}_{index}"
        elif isinstance(layer, nn.ReLU):
            name = f"relu{block}_{index}"
            layer = nn.ReLU(inplace=False)
        else:
            name = f"pool{block}"
            block, index = block + 1, 0
        model.add_module(name, layer)
        if name in content_layers:
            loss = ContentLoss(model(content_img))
            model.add_module(f"content_loss_{name}", loss)
            content_losses.append(loss)
        if name in style_layers:
            loss = StyleLoss(model(style_img))
            model.add_module(f"style_loss_{name}", loss)
            style_losses.append(loss)
    # cut everything after the last loss module
    last = max(i for i, m in enumerate(model) if isinstance(m, (ContentLoss, StyleLoss)))
    model = model[: last + 1]
    model.requires_grad_(False)
    return model, content_losses, style_losses


def _to_tensor(image: Image.Image, size: tuple[int, int], device) -> torch.Tensor:
    return images.to_tensor(image.resize(size, Image.Resampling.LANCZOS)).unsqueeze(0).to(device)


def reference_stylize(content: Image.Image, style: Image.Image, size: int, iterations: int, device, stamps: list[float]):
    width, height = images.fitted_size(*content.size, size)
    content_img = _to_tensor(content, (width, height), device)
    style_img = _to_tensor(style, (width, height), device)  # the tutorial needs equal sizes
    model, content_losses, style_losses = build_model(device, style_img, content_img, DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS)
    x = content_img.clone().requires_grad_(True)
    # the tutorial's LBFGS, bounded so that it makes exactly ``iterations`` evaluations
    optimizer = torch.optim.LBFGS([x], max_iter=iterations, max_eval=iterations)
    evaluations = [0]

    def closure():
        with torch.no_grad():
            x.clamp_(0, 1)
        optimizer.zero_grad()
        model(x)
        style_score = sum(sl.loss for sl in style_losses)
        content_score = sum(cl.loss for cl in content_losses)
        loss = 1e6 * style_score + 1.0 * content_score
        loss.backward()
        evaluations[0] += 1
        _sync(device)  # on CUDA the stamp marks the work done, not queued
        stamps.append(time.perf_counter())
        return loss

    while evaluations[0] < iterations:
        optimizer.step(closure)
    with torch.no_grad():
        x.clamp_(0, 1)
    return x.detach(), evaluations[0]


def time_reference(content: Image.Image, style: Image.Image, size: int, iterations: int, device: torch.device) -> dict[str, float]:
    stamps: list[float] = []
    _sync(device)
    start = time.perf_counter()
    _, evaluations = reference_stylize(content, style, size, iterations, device, stamps)
    _sync(device)
    total = time.perf_counter() - start
    return {"s_per_iteration": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), "s_per_image": total, "evaluations": evaluations}


# --- the quality criterion at one size ------------------------------------------------------------


def measure_quality(content: Image.Image, style: Image.Image, size: int, device: torch.device) -> dict[str, float]:
    """Defaults (300 iterations) at ``size``; judged by a VGG-19 with other random weights."""
    params = StyleParams(size=size, weights=WEIGHTS, device=str(device), precision=PRECISION)
    result = stylize(content, style, params)
    photo = images.resized_tensor(content, long_side=size)
    style_t = images.resized_tensor(style, long_side=size)
    painting = images.resized_tensor(style, exact=(photo.shape[2], photo.shape[1]))
    q_out = quality.measure(result.image, photo, style_t, result.weights_id, device)
    q_photo = quality.measure(photo, photo, style_t, result.weights_id, device)
    q_painting = quality.measure(painting, photo, style_t, result.weights_id, device)
    ratio = q_photo.style_distance / q_out.style_distance
    return {
        "size": size,
        "iterations": result.iterations,
        "style_distance_photo": q_photo.style_distance,
        "style_distance_output": q_out.style_distance,
        "style_ratio": ratio,
        "content_distance_output": q_out.content_distance,
        "content_distance_painting": q_painting.content_distance,
        "passes": ratio >= 5.0 and q_out.content_distance < q_painting.content_distance,
        "wall_time_s": result.wall_time_s,
        "precision": result.precision,
        "judge_weights": q_out.judge_weights,
    }


# --- command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated long sides (default: 64,128,256, plus 512 on CUDA)")
    parser.add_argument("--iterations", type=int, default=110, help="loss evaluations per run (default 110: the L-BFGS history is full after 100)")
    parser.add_argument("--rounds", type=int, default=1, help="time the trunks and the engine's steady state this many times in turn, the fastest of each kept (a shared machine: 3)")
    parser.add_argument("--steady", type=int, default=10, help="the engine's steady-state iteration: the mean of its last this many evaluations")
    parser.add_argument("--reference-iterations", type=int, default=20, help="loss evaluations of the reference loop's run (default 20)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, the core count)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the short untimed run of each side per size")
    parser.add_argument("--skip-reference", action="store_true", help="time only the engine")
    parser.add_argument("--quality", action="store_true", help="also run the defaults (300 iterations) at --quality-size and report the quality criterion (on by default on CUDA)")
    parser.add_argument("--quality-size", type=int, default=256)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="the engine's precision parameter (the reference is always fp32)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)

    global PRECISION
    PRECISION = args.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    execution.configure_backends(device)  # before anything is timed: both sides run with the engine's backend settings
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [64, 128, 256] + ([512] if device.type == "cuda" else [])
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (s/it is measured between evaluations)")
    content, style, label = sample_images()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"device: {device} ({name}); torch {torch.__version__}, {torch.get_num_threads()} CPU threads; images: {label}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (timings need an otherwise idle machine)")
    print(f"{args.reference_iterations} evaluations per run against the reference, {args.iterations} for the steady state; weights {WEIGHTS}; engine precision {PRECISION} -> {resolve_precision(PRECISION, device)}, reference fp32; engine defaults otherwise (lbfgs, avg pooling)", flush=True)
    load_network(WEIGHTS, device=device)  # the engine's network is cached before anything is timed
    peak = measure_peak(device)
    print("peak measured here (TFLOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in peak.items()), flush=True)

    rows = []
    for size in sizes:
        if not args.no_warmup:
            time_engine(content, style, size, 2, device)  # also makes the engine's execution choice for this shape
            if not args.skip_reference:
                time_reference(content, style, size, 2, device)
        width, height = images.fitted_size(*content.size, size)  # the size the engine optimises at
        shape = [1, 3, height, width]
        rounds = []
        for _ in range(args.rounds):
            before = time_trunks(shape, device)
            steady = time_engine(content, style, size, args.iterations, device, args.steady)
            # The trunk timed before and after the engine, the faster kept: a machine whose load drifts
            # during the engine's run then biases the ratio against the engine, never for it.
            rounds.append((steady, [min(b, a, key=lambda t: t["s_per_pass"]) for b, a in zip(before, time_trunks(shape, device))]))
        # Over the rounds, the fastest of each: on a shared machine a burst of load may fall on either side.
        steady = min((r[0] for r in rounds), key=lambda e: e["s_per_iteration_steady_min"])
        trunks = [min(same, key=lambda t: t["s_per_pass"]) for same in zip(*(r[1] for r in rounds))]
        row = {"size": size, "engine_steady": steady, "trunks": trunks, "round_ratios": [round_ratio(*r) for r in rounds]}
        # Against the reference: both sides make the same number of evaluations.
        engine = time_engine(content, style, size, args.reference_iterations, device)
        reference = None if args.skip_reference else time_reference(content, style, size, args.reference_iterations, device)
        row.update(engine=engine, reference=reference)
        if reference:
            row["ratio_per_iteration"] = reference["s_per_iteration"] / engine["s_per_iteration"]
            row["ratio_per_image"] = reference["s_per_image"] / engine["s_per_image"]
        rows.append(row)
        print(f"  {size} px done", file=sys.stderr, flush=True)

    header = f"{'size':>5} | {'engine s/it':>11} | {'ref s/it':>9} | {'ratio':>6} | {'engine s/image':>14} | {'ref s/image':>11} | {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        e, r = row["engine"], row["reference"]
        if r is None:
            print(f"{row['size']:>5} | {e['s_per_iteration']:>11.4f} | {'-':>9} | {'-':>6} | {e['s_per_image']:>14.2f} | {'-':>11} | {'-':>6}")
        else:
            print(
                f"{row['size']:>5} | {e['s_per_iteration']:>11.4f} | {r['s_per_iteration']:>9.4f} | {row['ratio_per_iteration']:>5.2f}x"
                f" | {e['s_per_image']:>14.2f} | {r['s_per_image']:>11.2f} | {row['ratio_per_image']:>5.2f}x"
            )

    again = measure_peak(device)  # the peak is the best seen: measured before and after the rest
    peak = {k: max(v, again[k]) for k, v in peak.items()}
    print("peak measured again at the end (TFLOP/s), the best of the two counts: " + ", ".join(f"{k} {v:.3f}" for k, v in again.items()))
    for row in rows:
        row.update(against_trunk(row["engine_steady"], row["trunks"], peak["peak"]))
    for row in rows:
        e = row["engine_steady"]
        print(f"{row['size']:>5} px, {e['shape'][2]}x{e['shape'][3]}: the bare trunk (forward + input-gradient backward, no loss):")
        for trunk in row["trunks"]:
            print(f"        {trunk['precision']} {trunk['layout']:<13} {trunk['s_per_pass'] * 1e3:8.1f} ms  {trunk['tflops']:.3f} TFLOP/s = {trunk['tflops'] / peak['peak']:.1%} of the peak")
        print(
            f"      engine ({e['precision']}, {e['execution']}): {e['s_per_iteration_steady_min'] * 1e3:.1f} ms per iteration (fastest of the last {e['steady_evaluations']} of {e['evaluations']}; mean {e['s_per_iteration_steady'] * 1e3:.1f}) = "
            f"{row['ratio_to_fastest_trunk']:.2f}x the fastest {e['precision']} trunk ({row['fastest_trunk_layout']}); outside the trunk "
            f"{row['outside_trunk_s'] * 1e3:.1f} ms = {row['outside_trunk_fraction']:.0%} of the iteration; {row['engine_fraction_of_peak']:.1%} of the peak"
        )
        if len(row["round_ratios"]) > 1:
            print(f"      each round's ratio: {', '.join(f'{r:.2f}x' for r in row['round_ratios'])}")

    result = {
        "load_average_after": os.getloadavg(),
        "precision": PRECISION,
        "precision_resolved": resolve_precision(PRECISION, device),
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iterations": args.iterations,
        "peak_tflops": peak,
        "weights": WEIGHTS,
        "images": label,
        "rows": rows,
    }
    if args.quality or device.type == "cuda":
        q = measure_quality(content, style, args.quality_size, device)
        result["quality"] = q
        print(
            f"quality at {q['size']} px ({q['iterations']} iterations, {q['wall_time_s']:.1f} s, judged by {q['judge_weights']}): "
            f"style distance photo {q['style_distance_photo']:.4f} -> output {q['style_distance_output']:.4f} "
            f"(x{q['style_ratio']:.1f}, needs >= 5); content distance output {q['content_distance_output']:.3f} "
            f"vs painting {q['content_distance_painting']:.3f}: {'PASS' if q['passes'] else 'FAIL'}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
