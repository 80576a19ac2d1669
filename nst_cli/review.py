"""``nst report``, ``nst review`` and ``nst export``: the commands that work on stored runs.

None of them imports Prefect: they read what a run stored (``nst_run.report``,
``nst_run.review``, ``nst_run.export``). Each is registered on the ``nst``
parser by :func:`register`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nst_cli.common import EXIT_OK, UsageError


def default_local_dir(run_uri: str) -> Path:
    """Where ``nst report`` copies an ``s3://`` run's report: ``~/.cache/nst/reports/<bucket>/<key>``."""
    from nst_core import storage
    from nst_run.results import run_folder

    parsed = storage.parse_uri(run_folder(run_uri))
    parts = [p for p in f"{parsed.bucket}/{parsed.key}".split("/") if p and p not in (".", "..")]
    return Path.home() / ".cache" / "nst" / "reports" / Path(*parts)


def cmd_report(args: argparse.Namespace) -> int:
    from nst_core import storage
    from nst_run.report import REPORT_FILE, build_report, download_report

    local_dir = Path(args.local_dir).expanduser() if args.local_dir else None
    remote = storage.is_s3(args.run)
    if remote and local_dir is None:
        local_dir = default_local_dir(args.run)
    if args.no_upload:
        if local_dir is None:
            raise UsageError("--no-upload needs an s3:// run or --local-dir")
        build_report(args.run, dest_uri=str(local_dir))
        opened = local_dir / REPORT_FILE
        print(f"report {opened} (built locally; nothing written to {storage.sanitize_uri(args.run)})")
    else:
        stored = build_report(args.run)
        print(f"report {storage.sanitize_uri(stored)}")
        opened = Path(stored.removeprefix("file://")) if not remote else None
        if local_dir is not None:
            opened = download_report(args.run, local_dir)
            print(f"local copy {opened}")
    if args.open and opened is not None:
        import webbrowser

        if not webbrowser.open(opened.resolve().as_uri()):
            print(f"could not start a browser; open {opened.resolve().as_uri()}", file=sys.stderr)
    return EXIT_OK


def cmd_review(args: argparse.Namespace) -> int:
    from nst_run import results, review

    run = results.open_run(args.run)
    if args.from_file:
        if args.target or args.decision:
            raise UsageError("--from-file takes no ITEM and no --decision (they are in the file)")
        try:
            payload = json.loads(Path(args.from_file).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--from-file {args.from_file}: cannot read a JSON file ({exc})") from None
        stored = review.record_bulk(run, payload, args.reviewer)
    else:
        if not args.target or not args.decision or not args.reviewer:
            raise UsageError("review needs ITEM (a manifest id or item id), --decision keep|reject and --reviewer NAME (or --from-file FILE)")
        stored = [review.record_decision(run, args.target, args.decision, args.reviewer, args.note)]
    for d in stored:
        ids = ", ".join(d.ids)
        print(f"{d.decision:<6} by {d.reviewer}: item {d.item_id[:12]} (id {ids}) -> {d.uri}")
    print(f"{len(stored)} decision(s) stored with run {run.name}; `nst report {run.shown_uri}` shows them")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from nst_run.export import DEFAULT_SHARD_BYTES, MIB, export_dataset

    if len(args.paths) < 2:
        raise UsageError("export needs one or more RUN_URI and a DEST")
    *runs, dest = args.paths
    result = export_dataset(runs, dest, only=args.only, form=args.format, max_shard_bytes=round(args.max_shard_mb * MIB) if args.max_shard_mb is not None else DEFAULT_SHARD_BYTES)
    print(f"exported {result.images} image(s) from {len(runs)} run(s) to {result.dest} ({result.form}): "
          f"{result.written} written, {result.already_there} already there")  # fmt: skip
    if result.migrated:
        print(f"  moved {result.migrated} image(s) of the earlier flat images/ layout into their images/<item id[:2]>/ folders")
    if result.shards:
        print(f"  shards: {len(result.shards)} file(s) under {result.dest}/data/")
    for reason, n in sorted(result.skipped.items()):
        print(f"  skipped {n} row(s): {reason}")
    for name, uri in result.files.items():
        print(f"  {name}: {uri}")
    if result.stale:
        print(f"WARNING: {len(result.stale)} file(s) in {result.dest} are not in this export "
              f"(from an earlier export?), e.g. {result.stale[0]}; export into an empty folder for a clean dataset", file=sys.stderr)  # fmt: skip
    if result.images == 0:
        print("WARNING: nothing was exported", file=sys.stderr)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report``, ``review`` and ``export`` to the ``nst`` parser."""
    p = subparsers.add_parser("report", help="(re)build a run's report.html from its stored metadata")
    p.add_argument("run", metavar="RUN_URI", help="run folder: {output}/runs/{run}, a path or s3:// URI")
    p.add_argument("--open", action="store_true", help="open the report in a browser (a local copy for s3:// runs)")
    p.add_argument("--local-dir", metavar="DIR", help="copy the report and thumbnails here (default for s3:// runs: ~/.cache/nst/reports/<bucket>/<key>)")
    p.add_argument("--no-upload", action="store_true", help="build into the local folder only; write nothing to the run's storage")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("review", help="record a keep/reject decision about an item of a run")
    p.add_argument("run", metavar="RUN_URI", help="run folder: {output}/runs/{run}, a path or s3:// URI")
    p.add_argument("target", metavar="ITEM", nargs="?", help="manifest id of a row, or an item id (or 6+ leading hex digits of one)")
    p.add_argument("--decision", choices=("keep", "reject"), help="keep or reject")
    p.add_argument("--reviewer", metavar="NAME", help="who decides (each reviewer's latest decision counts)")
    p.add_argument("--note", metavar="TEXT", help="optional note")
    p.add_argument("--from-file", metavar="FILE", help="decisions file saved from the report page (keep/reject marks)")
    p.set_defaults(func=cmd_review)

    p = subparsers.add_parser("export", help="export runs as a Hugging Face image-folder dataset")
    p.add_argument("paths", nargs="+", metavar="RUN_URI... DEST", help="one or more run folders, then the destination folder or s3:// prefix")
    p.add_argument("--only", choices=("kept",), help="only items every reviewer kept")
    p.add_argument("--format", choices=("imagefolder", "parquet"), default="imagefolder",
                   help="imagefolder (default): images/<item id[:2]>/ + metadata; parquet: shards with the images in them (large exports, past ~100k images)")  # fmt: skip
    p.add_argument("--max-shard-mb", type=float, metavar="MB", help="parquet: image megabytes per shard (default 500, as datasets writes)")
    p.set_defaults(func=cmd_export)
