"""The sample images, shipped with the package so the demo, the tests and the benchmarks need nothing
beside the clone (or the installed wheel). Sources and licences: ``SOURCES.md`` in this folder.

* :func:`folder`: the folder that holds them (``tubingen.jpg``, ``hoovertowernight.jpg``,
  ``starry_night.jpg``, ``shipwreck.jpg``) and ``samples.csv``, the demo manifest (paths relative to it).
* :func:`path`: one of them by file name; :class:`FileNotFoundError` naming the folder when absent.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONTENTS = ("tubingen.jpg", "hoovertowernight.jpg")
STYLES = ("starry_night.jpg", "shipwreck.jpg")
MANIFEST = "samples.csv"

__all__ = ["CONTENTS", "MANIFEST", "STYLES", "folder", "path"]


def folder() -> Path:
    """The folder of the sample images (a real directory: setuptools installs package data as files)."""
    return Path(str(resources.files(__name__)))


def path(name: str) -> Path:
    """Path of the sample file ``name``.

    Raises:
        FileNotFoundError: when the file is not part of the package (a damaged install).
    """
    found = folder() / name
    if not found.is_file():
        raise FileNotFoundError(f"sample file {name!r} not found in {folder()}")
    return found
