"""An input's identity learned once, and its decoded image read once per process.

**Identity rule.** An input is the sha256 of its bytes. That hash is computed by reading the object
once, streamed in bounded memory (:func:`nst_core.storage.sha256_stream`), and recorded under the
output prefix (:func:`nst_run.paths.input_hash_record`) against the exact version it was computed
for: the URI, the object's version tag (S3 ``VersionId``, else its ``ETag``; a local file's
modification time and inode) and its size (:func:`nst_core.storage.stat`). A later run that meets
the same URI pays one HEAD and one small GET instead of a download; an object rewritten since has
another version tag, so its old hash is never taken for its new bytes. The worker that computes an
item checks the bytes it fetches against the hash the item was named by in any case.

* :func:`identify`: an input's :class:`Identity` (sha256 and displayed size), from the record or
  by hashing it.
* :class:`DecodedImages`: decoded inputs kept per process, most recently used first, bounded in
  bytes, so a style shared by 10,000 rows is fetched and decoded once per worker, not 10,000 times.

No torch and no Prefect here.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from PIL import Image

from nst_core import images, storage
from nst_run import paths

DEFAULT_CACHE_MB = 256  # NST_INPUT_CACHE_MB: decoded inputs one worker process keeps


@dataclass(frozen=True)
class Identity:
    """What names an input: its bytes' sha256, and its (width, height) as displayed (None when unknown)."""

    sha256: str
    content_size: tuple[int, int] | None


def record_key(uri: str, version: storage.ObjectStat) -> str:
    """The record's name: a hash of the URI, version tag and size (the URI itself is never stored in clear)."""
    return hashlib.sha256(f"{uri}\0{version.version}\0{version.size}".encode()).hexdigest()


def _read_record(record_uri: str, version: storage.ObjectStat) -> Identity | None:
    try:
        record = json.loads(storage.read_bytes(record_uri, max_bytes=4096))
        if record.get("size") != version.size or record.get("version") != version.version:
            return None  # a key collision, or a record someone edited: hash again
        size = record.get("content_size")
        return Identity(str(record["sha256"]), (int(size[0]), int(size[1])) if size else None)
    except storage.StorageError as exc:
        if exc.transient:
            raise
        return None  # no record (or an unreadable one): hash the input
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _write_record(record_uri: str, uri: str, version: storage.ObjectStat, identity: Identity) -> None:
    record = {
        "uri": storage.sanitize_uri(uri),
        "size": version.size,
        "version": version.version,
        "sha256": identity.sha256,
        "content_size": list(identity.content_size) if identity.content_size else None,
    }
    try:
        storage.write_bytes(record_uri, json.dumps(record).encode(), "application/json")
    except storage.StorageError:
        pass  # the record only saves work: the next run hashes the input again


def identify(uri: str, max_bytes: int, output_uri: str) -> Identity:
    """The input's sha256 and displayed size: from its record under ``output_uri`` when one matches
    its current version, else by hashing it (and recording the result).

    Raises:
        ObjectTooLarge: the input is larger than ``max_bytes`` (nothing read).
        StorageError: it cannot be read (``transient`` when retrying may help).
    """
    version = storage.stat(uri)
    storage.check_size(uri, version.size, max_bytes)
    if (known := _read_record(paths.input_hash_record(output_uri, record_key(uri, version)), version)) is not None:
        return known
    sha, read, head = storage.sha256_stream(uri, max_bytes, version=version)
    identity = Identity(sha, images.header_size(head, complete=len(head) == read.size))
    _write_record(paths.input_hash_record(output_uri, record_key(uri, read)), uri, read, identity)
    return identity


class DecodedImages:
    """Decoded images of this process, the least recently used dropped once ``max_bytes`` is passed.

    Keys say what was decoded (URI, sha256, pixel cap), so a changed object is a new entry. An image
    larger than the whole budget is returned without being kept. Thread-safe; two threads that miss
    the same key at once may both decode it (the cost of not holding a lock while reading).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._images: OrderedDict[Hashable, tuple[Image.Image, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable, load: Callable[[], Image.Image]) -> Image.Image:
        with self._lock:
            if (found := self._images.get(key)) is not None:
                self._images.move_to_end(key)
                self.hits += 1
                return found[0]
            self.misses += 1
        image = load()
        size = image.width * image.height * len(image.getbands())
        if size > self.max_bytes:
            return image
        with self._lock:
            if key not in self._images:
                self._images[key] = (image, size)
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._images.popitem(last=False)
                self._bytes -= dropped
        return image


def cache_budget_bytes() -> int:
    """``NST_INPUT_CACHE_MB`` (default 256) in bytes; 0 turns the cache off."""
    return int(float(os.environ.get("NST_INPUT_CACHE_MB", DEFAULT_CACHE_MB)) * (1 << 20))
