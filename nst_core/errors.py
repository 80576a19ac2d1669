"""Errors the engine raises for input a user controls.

Each one carries a single line that names the thing at fault and why, so the
CLI can print it without a traceback (exit code 2) and the pipeline can store
it as an item's reason.
"""

from __future__ import annotations


class NSTError(Exception):
    """Base class: bad input a user can fix (CLI exit code 2)."""


class ImageError(NSTError):
    """An image could not be used: not an image, truncated, too large, too small."""


class WeightsError(NSTError):
    """VGG-19 weights could not be had or are not usable."""


class ParamsError(NSTError):
    """Style parameters are invalid."""
