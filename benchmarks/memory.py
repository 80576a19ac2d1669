"""Memory per item: ``estimate_item_bytes`` (what automatic batch sizes are cut by) against what runs keep.

    .venv/bin/python benchmarks/memory.py                                  # 128,256 px on the CPU, 256,512 on CUDA
    .venv/bin/python benchmarks/memory.py --sizes 512 --json benchmarks/results/memory-gpu.json

Per size: the peak bytes of a run of one item and of two (``nst_core.execution.peak_bytes``: on CUDA
``torch.cuda.max_memory_allocated``, cuDNN's workspaces included; on the CPU the profiler's memory
timeline), their difference (what one more item costs: the network and what a batch holds once are
left out), the estimate at the precision the device resolves ``auto`` to, and their ratio (the
issue's bound: within 20 %). On CUDA also the automatic batch size that estimate gives now (70 % of
what is free), and the peak of a run of that many items against the free memory it was cut from.
Three iterations per run: the L-BFGS history is allocated whole at the second.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nst_samples  # noqa: E402
from nst_core import execution, images  # noqa: E402
from nst_core.engine import Job, estimate_item_bytes, stylize_batch  # noqa: E402
from nst_core.network import load_network, resolve_device, resolve_precision  # noqa: E402
from nst_core.params import StyleParams  # noqa: E402
from nst_run.planning import AUTO_MAX_ITEMS  # noqa: E402

WEIGHTS = "random:0"


def measure(size: int, device: torch.device, precision: str) -> dict[str, object]:
    """One item's bytes at ``size``: measured (a batch of two less one of one) and estimated."""
    folder = nst_samples.folder()
    content, style = images.load_image(folder / "tubingen.jpg"), images.load_image(folder / "starry_night.jpg")
    network = load_network(WEIGHTS, device=device)
    params = StyleParams(size=size, iterations=3, weights=WEIGHTS, device=str(device), precision=precision, tolerance=0)

    def run(batch: int) -> int:
        return execution.peak_bytes(lambda: stylize_batch([Job(content, style, params)] * batch, network=network), device)

    stylize_batch([Job(content, style, params.model_copy(update={"iterations": 1}))], network=network)  # layout chosen, trunk copies made
    one, two = run(1), run(2)
    width, height = images.fitted_size(*content.size, size)
    resolved = resolve_precision(precision, device)
    estimate = estimate_item_bytes(height, width, params, resolved)
    row: dict[str, object] = {
        "size": size, "shape": [height, width], "precision": resolved, "peak_one_item_mb": one / 1e6, "peak_two_items_mb": two / 1e6,
        "per_item_mb": (two - one) / 1e6, "estimate_mb": estimate / 1e6, "estimate_over_measured": estimate / max(1, two - one),
    }  # fmt: skip
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        batch = int(max(1, min(AUTO_MAX_ITEMS, 0.7 * free // estimate)))  # as nst_run.execute.auto_batch_size
        try:
            peak_mb: float | str = run(batch) / 1e6
        except torch.OutOfMemoryError:  # the estimate is too low: what the benchmark is there to show
            peak_mb = "out of memory"
            torch.cuda.empty_cache()
        row.update({"free_mb": free / 1e6, "auto_batch_size": batch, "peak_auto_batch_mb": peak_mb})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated long sides (default: 128,256 on the CPU, 256,512 on CUDA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([256, 512] if device.type == "cuda" else [128, 256])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(f"device: {device} ({name}); torch {torch.__version__}; precision {args.precision} -> {resolve_precision(args.precision, device)}")
    print(f"{'size':>5} {'shape':>10} {'1 item MB':>10} {'2 items MB':>11} {'per item MB':>12} {'estimate MB':>12} {'est/measured':>13}")
    rows = []
    for size in sizes:
        row = measure(size, device, args.precision)
        rows.append(row)
        shape = "x".join(str(v) for v in row["shape"])  # type: ignore[attr-defined]
        print(
            f"{size:>5} {shape:>10} {row['peak_one_item_mb']:>10.1f} {row['peak_two_items_mb']:>11.1f} {row['per_item_mb']:>12.1f} "
            f"{row['estimate_mb']:>12.1f} {row['estimate_over_measured']:>13.3f}"
            + (f"  auto batch {row['auto_batch_size']} of {row['free_mb']:.0f} MB free: peak {row['peak_auto_batch_mb']} MB" if "auto_batch_size" in row else ""),
            flush=True,
        )  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": str(device), "device_name": name, "torch": torch.__version__, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
