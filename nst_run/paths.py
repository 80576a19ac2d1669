"""Every stored path of a run, named once.

::

    {output_uri}/items/{item_id}/stylized.{png,jpg,webp}   the output image
                                /loss.csv, loss.png         the loss history and its plot
                                /snapshots/iter-NNNNN.png   snapshots (``save_every``)
                                /.lease                     the item's lease (nst_run.lease)
                                /meta.json                  written last: the mark of a finished item
    {output_uri}/runs/{run}/parts/results-NNNNN.csv         rows as they settle, a chunk's worth per part
                           /results.csv, results.parquet    the results table, written at the end
                           /summary.json
                           /report.html                     the report (nst_run.report)
                           /report-files/{index,cards}-<sha256>.js   its data scripts, loaded on demand
                           /thumbs/in-<sha256>-<px>.jpg     input thumbnails (content addresses)
                           /thumbs/out-<item id>-<px>.jpg   output thumbnails
                           /decisions/<item id>/<UTC stamp>-<reviewer slug>.json   review decisions
    {output_uri}/input-hashes/<kk>/<key>.json               an input's sha256 for one (URI, version, size)

Only names and joins here (no reads or writes, no torch, no Prefect).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nst_core import storage

ITEMS_DIR = "items"
RUNS_DIR = "runs"

META_FILE = "meta.json"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
IMAGE_STEM = "stylized"
SNAPSHOT_FOLDER = "snapshots"
LEASE_FILE = ".lease"

PARTS_DIR = "parts"
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
SUMMARY_FILE = "summary.json"
TABLE_RESERVE = ".table-reserve"  # room held for the tables on a local disk while a run goes (nst_run.results)
REPORT_FILE = "report.html"
THUMBS_DIR = "thumbs"
REPORT_FILES_DIR = "report-files"
DECISIONS_DIR = "decisions"
INPUT_HASHES_DIR = "input-hashes"
# Files a run address may name instead of its folder (``nst report RUN/report.html``).
RUN_FILES = (REPORT_FILE, SUMMARY_FILE, RESULTS_CSV, RESULTS_PARQUET)
# What an item id (or a prefix of one) looks like: hex only, so it never names a path outside items/.
ITEM_ID = re.compile(r"^[0-9a-f]{6,64}$")


def input_hash_record(output_uri: str, key: str) -> str:
    """``{output_uri}/input-hashes/{key[:2]}/{key}.json``: what is known of one version of one input
    (``key`` names the URI, version and size; see :mod:`nst_run.inputs`)."""
    return storage.join(output_uri, INPUT_HASHES_DIR, key[:2], f"{key}.json")


def item_folder(output_uri: str, item_id: str) -> str:
    """``{output_uri}/items/{item_id}``."""
    return storage.join(output_uri, ITEMS_DIR, item_id)


def image_name(image_format: str = "png") -> str:
    """The output image's file name in its item folder: ``stylized.png``, ``stylized.jpg``, ``stylized.webp``."""
    ext = {"jpeg": "jpg"}.get(image_format, image_format)
    return f"{IMAGE_STEM}.{ext}"


@dataclass(frozen=True)
class ItemPaths:
    """Where one item's files live."""

    output_uri: str
    item_id: str
    image_format: str = "png"

    @property
    def folder(self) -> str:
        return item_folder(self.output_uri, self.item_id)

    @property
    def image(self) -> str:
        return storage.join(self.folder, image_name(self.image_format))

    @property
    def loss_csv(self) -> str:
        return storage.join(self.folder, LOSS_CSV)

    @property
    def loss_png(self) -> str:
        return storage.join(self.folder, LOSS_PNG)

    @property
    def meta(self) -> str:
        return storage.join(self.folder, META_FILE)

    @staticmethod
    def snapshot_name(iteration: int) -> str:
        """A snapshot's path relative to the item folder (as ``meta.json``'s ``snapshots`` lists it)."""
        return f"{SNAPSHOT_FOLDER}/iter-{iteration:05d}.png"


def run_folder(output_uri: str, run: str) -> str:
    """``{output_uri}/runs/{run}``."""
    return storage.join(output_uri, RUNS_DIR, run)


def runs_prefix(output_uri: str) -> str:
    """The prefix under which an output folder's runs are listed."""
    return storage.join(output_uri, RUNS_DIR) + "/"


def split_run_folder(folder: str) -> tuple[str | None, str]:
    """``{output_uri}/runs/{run}`` -> (``output_uri``, ``run``); a folder elsewhere -> (None, its last name)."""
    head, sep, name = folder.rpartition(f"/{RUNS_DIR}/")
    if sep and name and "/" not in name:
        return head, name
    return None, folder.rstrip("/").rsplit("/", 1)[-1]


def results_part(folder: str, number: int) -> str:
    """The ``number``-th results part of the run in ``folder``: ``parts/results-NNNNN.csv``."""
    return storage.join(folder, PARTS_DIR, f"results-{number:05d}.csv")


def run_file(folder: str, name: str) -> str:
    """A file of the run in ``folder`` (one of the names above: ``RESULTS_CSV``, ``SUMMARY_FILE``, ...)."""
    return storage.join(folder, name)


def input_thumb_name(sha256: str, px: int) -> str:
    return f"in-{sha256[:40]}-{px}.jpg"


def output_thumb_name(item_id: str, px: int) -> str:
    return f"out-{item_id[:40]}-{px}.jpg"


def decisions_prefix(folder: str) -> str:
    """Where the run in ``folder`` keeps its review decisions."""
    return storage.join(folder, DECISIONS_DIR)


def decision_file(folder: str, item_id: str, name: str) -> str:
    """One decision: ``decisions/{item_id}/{name}.json`` (``name``: UTC stamp and reviewer slug)."""
    return storage.join(decisions_prefix(folder), item_id, name + ".json")
