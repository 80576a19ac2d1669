"""The ``nst`` command.

Exit codes: 0 done; 1 some work failed (or an unexpected error); 2 unusable
input or invocation (one clear line on stderr, no traceback, no output file).

Every style parameter is a flag named after the field (``--style-weight``);
list values are separated by ``|`` or ``,``. Commands that run the Prefect
flow import Prefect only when they are called.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from nst_cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, add_style_flags, build_params, format_validation_error, style_overrides


def package_version() -> str:
    """The installed nst-bulk version (``importlib.metadata``; no torch import for ``--version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nst-bulk")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _sibling(out: str, suffix: str) -> str:
    """``out.png`` -> ``out.loss.csv`` (works for paths and s3:// URIs)."""
    root, _ = os.path.splitext(out)
    return root + suffix


def _read_image(uri: str, max_pixels: int):
    from nst_core import images, storage

    return images.load_image(storage.read_bytes(uri), name=storage.sanitize_uri(uri), max_pixels=max_pixels)


def _input_names(content_uri: str, style_uris: Sequence[str], params) -> dict[str, str]:
    """How the engine's errors name each input (``engine.Job.names``): the URI as given, by role."""
    from nst_core import storage
    from nst_core.params import input_role

    names = {"content": content_uri}
    names.update((input_role("style", k), uri) for k, uri in enumerate(style_uris))
    names.update((input_role("style_mask", k), uri) for k, uri in enumerate(params.style_masks or ()))
    if params.init_is_image:
        names["init"] = params.init
    return {role: storage.sanitize_uri(uri) for role, uri in names.items()}


class _Progress:
    """A tqdm bar showing the iteration and the loss terms."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="it", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, info) -> None:  # IterationInfo
        losses = info.losses[0]
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items() if k in ("total", "content", "style", "tv")})
        self.bar.update(info.iteration - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _snapshot_path(out: str, iteration: int) -> str:
    """``out.png`` -> ``out.snap-00050.png``: the snapshot of iteration 50 (``--save-every``)."""
    return _sibling(out, f".snap-{iteration:05d}.png")


def _same_address(a: str, b: str) -> bool:
    """Whether two addresses name one object (local paths compared as real files, S3 by bucket and key)."""
    from nst_core import storage

    try:
        pa, pb = storage.parse_uri(a), storage.parse_uri(b)
    except ValueError:
        return False
    if pa.scheme != pb.scheme:
        return False
    if pa.scheme == "s3":
        return (pa.bucket, pa.key) == (pb.bucket, pb.key)
    assert pa.path is not None and pb.path is not None
    return os.path.realpath(pa.path) == os.path.realpath(pb.path)


def _run_engine(content_uri: str, style_uri: str, out: str, params, quiet: bool) -> int:
    from nst_core import engine, history, images, storage
    from nst_core.network import resolve_device
    from nst_core.params import StyleInputsError
    from nst_core.weights import WeightsSpec

    ext = os.path.splitext(out)[1].lower().lstrip(".")
    fmt = {"jpg": "jpeg"}.get(ext, ext)
    if fmt not in images.OUTPUT_FORMATS:
        raise UsageError(f"-o {out}: the output must end in .png, .jpg, .jpeg or .webp")
    style_uris = [part.strip() for part in style_uri.split("|")]  # several styles: 'a.jpg|b.jpg'
    if not all(style_uris):
        raise UsageError(f"STYLE {style_uri!r}: an empty style in the '|'-separated list")
    try:
        params.check_styles(len(style_uris))
    except StyleInputsError as exc:
        name = "STYLE" if exc.field == "style_uri" else "--" + exc.field.replace("_", "-")
        raise UsageError(f"{name}: {exc.reason}") from None
    inputs = [content_uri, *style_uris, *(params.style_masks or ()), *([params.init] if params.init_is_image else [])]
    if any(_same_address(out, uri) for uri in inputs):
        raise UsageError(f"-o {storage.sanitize_uri(out)}: is one of the input images; it would be overwritten")
    content = _read_image(content_uri, params.max_pixels)
    styles = [content if uri == content_uri else _read_image(uri, params.max_pixels) for uri in style_uris]
    masks = [_read_image(uri, params.max_pixels) for uri in params.style_masks] if params.style_masks else None
    init_image = _read_image(params.init, params.max_pixels) if params.init_is_image else None
    spec = WeightsSpec.parse(params.weights)
    weights_path = str(storage.fetch_to_cache(params.weights)) if spec.kind == "file" else None
    if spec.is_random:
        print(
            f"WARNING: weights={params.weights} are untrained random weights (a smoke run, not ImageNet VGG-19); "
            "every output records this.",
            file=sys.stderr,
        )
    network = engine.network_for(params, resolve_device(params.device), weights_path)
    progress = _Progress(params.iterations, enabled=not quiet)
    try:
        result = engine.stylize(
            content, styles, params, init_image=init_image, style_masks=masks, network=network, callback=progress,
            names=_input_names(content_uri, style_uris, params),
        )  # fmt: skip
    finally:
        progress.close()
    label = f"{os.path.basename(content_uri)} x {'|'.join(map(os.path.basename, style_uris))}  weights={result.weights_id}"
    storage.write_bytes(out, images.encode(result.to_pil(), fmt))
    storage.write_bytes(_sibling(out, ".loss.csv"), history.to_csv(result.history), "text/csv")
    storage.write_bytes(_sibling(out, ".loss.png"), history.to_png(result.history, label), "image/png")
    for iteration, image in result.snapshots:
        storage.write_bytes(_snapshot_path(out, iteration), images.encode(image, "png"), "image/png")
    final = ", ".join(f"{k}={v:.4g}" for k, v in result.final_losses.items() if ":" not in k)
    print(f"wrote {out} ({result.iterations} iterations in {result.wall_time_s:.1f} s on {result.device}, {result.precision}; {final})")
    print(f"loss table {_sibling(out, '.loss.csv')}, loss plot {_sibling(out, '.loss.png')}")
    if result.extra.get("divergences"):
        fired: list[int] = result.extra["divergences"]  # type: ignore[assignment]
        where = f"iteration{'s' if len(fired) > 1 else ''} {', '.join(map(str, fired))}"
        print(f"L-BFGS diverged at {where}: the best image was put back and the step halved each time")
    if result.image_iteration is not None and result.image_iteration != result.history[-1]["iteration"]:
        print(f"the image is iteration {result.image_iteration}'s, the lowest total loss of the run")
    if result.snapshots:
        print(f"{len(result.snapshots)} snapshots {_sibling(out, '.snap-NNNNN.png')} (every {params.save_every} iterations)")
    return EXIT_OK


def cmd_stylize(args: argparse.Namespace) -> int:
    params = build_params(style_overrides(args))
    return _run_engine(args.content, args.style, args.output, params, args.quiet)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """The paper's Figure 1: reconstruct an image from white noise by content or style alone."""
    values = style_overrides(args)
    has_content, has_style = "content_layers" in values, "style_layers" in values
    if has_content == has_style:
        raise UsageError("reconstruct needs exactly one of --content-layers or --style-layers")
    values.setdefault("init", "noise")
    if has_content:
        values.update(style_layers=[], style_weight=0.0)
    else:
        values.update(content_layers=[], content_weight=0.0)
    params = build_params(values)
    return _run_engine(args.image, args.image, args.output, params, args.quiet)


def _parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs as a dict; an unknown key is refused with the nearest valid names."""
    from nst_core.params import StyleParams

    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r}: expected key=value")
        name = key.strip().replace("-", "_")
        if name not in StyleParams.model_fields:
            close = difflib.get_close_matches(name, list(StyleParams.model_fields), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; `nst run --help` lists the style parameters"
            raise UsageError(f"--set {key.strip()}={value}: unknown parameter {key.strip()!r}{hint}")
        values[name] = value
    return values


def cmd_run(args: argparse.Namespace) -> int:
    from nst_cli.pipeline import run_manifest

    return run_manifest(args, _parse_sets(args.set or []))


def cmd_validate(args: argparse.Namespace) -> int:
    from nst_cli.pipeline import validate_manifest

    return validate_manifest(args, _parse_sets(args.set or []))


def cmd_demo(args: argparse.Namespace) -> int:
    from nst_cli.pipeline import demo

    return demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nst", description="Bulk neural style transfer (Gatys et al., 2015).")
    parser.add_argument("--version", action="version", version=f"nst {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stylize", help="stylise one content image with one style image (or a blend of several)")
    p.add_argument("content", help="content image: path or s3:// URI")
    p.add_argument("style", help="style image: path or s3:// URI; several separated by '|' ('a.jpg|b.jpg'), see --style-blend-weights and --style-masks")
    p.add_argument("-o", "--output", required=True, help="output image (.png/.jpg/.webp), path or s3:// URI")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_style_flags(p, skip=("output_format",))  # the format follows -o's extension
    p.set_defaults(func=cmd_stylize)

    p = sub.add_parser("reconstruct", help="reconstruct an image from noise by its content or style representation (Figure 1)")
    p.add_argument("image", help="image: path or s3:// URI")
    p.add_argument("-o", "--output", required=True, help="output image")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_style_flags(p, skip=("output_format",))
    p.set_defaults(func=cmd_reconstruct)

    for name, func, helptext in (
        ("run", cmd_run, "run a manifest through the Prefect flow"),
        ("validate", cmd_validate, "check a manifest and print the plan without running it"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("manifest", help="manifest CSV: path or s3:// URI")
        p.add_argument("--output", "-o", required=(name == "run"), help="output prefix: directory or s3:// URI")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a style parameter default under the manifest's columns (repeatable)")
        p.add_argument("--strict", action="store_true", help="fail before any work when any row is invalid")
        p.add_argument("--no-local-paths", action="store_true", help="refuse local paths in the manifest (only s3://)")
        if name == "validate":
            p.add_argument("--json", action="store_true", help="print the plan as JSON (and nothing else) on stdout")
        if name == "run":
            p.add_argument("--force", action="store_true", help="redo items that are already done")
            p.add_argument("--max-items", type=int, default=None, help="stop planning after this many rows")
            from nst_cli.pipeline import RUN_OPTIONS

            for option, (kind, text) in RUN_OPTIONS.items():
                p.add_argument("--" + option.replace("_", "-"), type=kind, default=None, help=text)
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="run the sample manifest end to end on the embedded defaults")
    p.add_argument("--output", "-o", default="nst-demo-output", help="output folder (default: ./nst-demo-output)")
    p.add_argument("--size", type=int, default=96, help="long side in pixels (default 96)")
    p.add_argument("--iterations", type=int, default=60, help="iterations per item (default 60)")
    p.set_defaults(func=cmd_demo)
    __import__("nst_cli.serve").serve.register(sub)  # `nst serve`: the deployments (nst_cli/serve.py)
    __import__("nst_cli.review").review.register(sub)  # `nst report`, `nst review`, `nst export` (nst_cli/review.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from nst_core.errors import NSTError
    from nst_core.storage import StorageError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"nst: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (NSTError, ValidationError) as exc:
        message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        print(f"nst: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:
        print(f"nst: error: {exc}", file=sys.stderr)
        return EXIT_FAILED if getattr(exc, "transient", False) else EXIT_USAGE
    except ValueError as exc:  # e.g. an unsupported URI scheme, an unavailable device
        print(f"nst: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nst: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
