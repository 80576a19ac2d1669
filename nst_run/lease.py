"""Leases: at most one worker computes an item at a time, across concurrent runs.

Two runs of the same manifest (a scheduled run overlapping a manual one, a
re-run started while the first still goes) resolve the same content-addressed
items. Before computing an item a worker takes its lease, a small JSON object
``{item folder}/.lease``::

    {"owner": "<flow run id>", "token": "<uuid4>", "expires_at": <unix time>}

Every transition is a compare-and-swap on the state it read, so no two can
undo each other (``storage.read_versioned`` / ``replace_if_version`` /
``delete_if_version``: S3 ``If-Match`` on the lease object's ETag, locally a
hash check under the item folder's ``flock``):

* **Take**: a conditional create (S3 ``PutObject`` with ``If-None-Match: *``;
  locally a hard link that fails when the target exists). Exactly one of
  several concurrent callers wins.
* **Same owner**: a lease already held by the same owner (a Prefect retry of
  the same flow run's task) is renewed, conditional on the state read.
* **Expired**: a worker that dies (SIGKILL, lost machine) stops renewing its
  lease; once ``expires_at`` has passed, the lease is taken over by replacing
  exactly the expired state that was read, so of several workers that see the
  same stale lease exactly one takes it.
* **Renew**: a :class:`LeaseKeeper` thread rewrites each held lease's expiry
  every ``ttl_s / 3`` while the item is being computed, conditional on the
  state this worker last wrote. A renewal never re-creates a released lease
  and never overwrites another worker's takeover: it learns it lost instead.
* **Release**: deleting ``.lease`` (conditional on our state) after the
  item's ``meta.json`` is written. A failed release is harmless: the lease expires.

Expiry compares wall clocks of different machines: keep ``ttl_s`` well above
the clock skew of the fleet (NTP keeps it under a second; the default TTL is
minutes).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nst_core import storage
from nst_run.paths import LEASE_FILE

DEFAULT_TTL_S = 300.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRecord:
    """What a lease object says: who holds it, which grant this is, until when."""

    owner: str
    token: str
    expires_at: float

    def to_bytes(self) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token, "expires_at": self.expires_at}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        """Parse a lease; an unreadable one counts as expired (its token derived from its bytes)."""
        try:
            raw = json.loads(data)
            return cls(str(raw["owner"]), str(raw["token"]), float(raw["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return cls(owner="?", token="corrupt-" + storage.sha256_bytes(data)[:16], expires_at=0.0)

    def expired(self, now: float) -> bool:
        return self.expires_at <= now


@dataclass
class Lease:
    """A lease this worker holds on one item folder.

    ``version`` is the storage version of the state this worker last wrote
    (or read and adopted); every renewal and the release are conditional on it.
    """

    folder: str
    record: LeaseRecord
    ttl_s: float
    version: str
    lost: bool = False
    released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def uri(self) -> str:
        return storage.join(self.folder, LEASE_FILE)

    def renew(self, clock: Callable[[], float] = time.time) -> bool:
        """Push the expiry forward if the lease is still ours; False (and ``lost``) when it is not.

        Never re-creates a released or deleted lease and never overwrites
        another worker's record: the write is conditional on the state this
        worker last wrote. When that fails but the stored record is still ours
        (an earlier renewal landed though its answer was lost), it is adopted
        and renewed once more.
        """
        with self._lock:
            if self.lost or self.released:
                return False
            for _ in range(2):
                fresh = LeaseRecord(self.record.owner, self.record.token, clock() + self.ttl_s)
                version = storage.replace_if_version(self.uri, fresh.to_bytes(), self.version, "application/json")
                if version is not None:
                    self.record, self.version = fresh, version
                    return True
                current = _read(self.uri)
                if current is None or current[0].token != self.record.token:
                    self.lost = True
                    return False
                self.version = current[1]
            self.lost = True
            return False

    def release(self) -> None:
        """Give the lease up (best effort: a lease that cannot be deleted expires by itself).

        Deletes ``.lease`` only while it holds this worker's record; stops any
        further renewal of this lease first.
        """
        with self._lock:
            if self.released:
                return
            self.released = True
            if self.lost:
                return
            try:
                _delete_while_token(self.uri, self.record.token, self.version)
            except storage.StorageError as exc:
                log.debug("lease %s not released (%s); it expires by itself", self.uri, exc)


def _read(uri: str) -> tuple[LeaseRecord, str] | None:
    """The stored lease record and its version, or None when there is none."""
    try:
        data, version = storage.read_versioned(uri)
    except storage.ObjectNotFound:
        return None
    return LeaseRecord.from_bytes(data), version


def _delete_while_token(uri: str, token: str, version: str | None = None) -> bool:
    """Delete the lease while it holds ``token``; True if this call deleted it.

    A change between read and delete (our own keeper's renewal) is read again;
    another token, or no lease, ends it without deleting.
    """
    for _ in range(5):
        if version is None:
            current = _read(uri)
            if current is None or current[0].token != token:
                return False
            version = current[1]
        if storage.delete_if_version(uri, version):
            return True
        version = None
    return False


def acquire(folder: str, owner: str, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time) -> Lease | LeaseRecord:
    """Take the lease of an item folder for ``owner``.

    Returns the :class:`Lease` when ``owner`` now holds it (created, renewed
    because ``owner`` already held it, or taken over from an expired holder),
    else the current holder's :class:`LeaseRecord`. Storage errors propagate.
    """
    uri = storage.join(folder, LEASE_FILE)
    for _ in range(5):  # each turn ends in a decision unless the lease changed hands under us
        mine = LeaseRecord(owner, uuid.uuid4().hex, clock() + ttl_s)
        if (version := storage.create_versioned(uri, mine.to_bytes(), "application/json")) is not None:
            return Lease(folder, mine, ttl_s, version)
        read = _read(uri)
        if read is None:
            continue  # released between our create and our read: try again
        current, version = read
        if current.owner == owner:
            mine = LeaseRecord(owner, current.token, clock() + ttl_s)  # a retry of our own task: same grant
        elif not current.expired(clock()):
            return current
        # Ours to renew, or expired: replace exactly the state we read; a change meanwhile means read again.
        if (new_version := storage.replace_if_version(uri, mine.to_bytes(), version, "application/json")) is not None:
            return Lease(folder, mine, ttl_s, new_version)
    read = _read(uri)
    return read[0] if read is not None else LeaseRecord("?", "", 0.0)


def release_owned(folder: str, owner: str) -> bool:
    """Delete the folder's lease if ``owner`` holds it (a lease its task could not release); True if deleted.

    For a run cleaning up after items that failed while storage was unreachable:
    their leases would otherwise block the next run until their TTL passed.
    Conditional on the state read, so a lease another run took meanwhile stays.
    """
    uri = storage.join(folder, LEASE_FILE)
    read = _read(uri)
    if read is None or read[0].owner != owner:
        return False
    return _delete_while_token(uri, read[0].token, read[1])


class LeaseKeeper:
    """Renews held leases in a background thread every ``ttl_s / 3`` seconds.

    Use as a context manager; :meth:`hold` adds a lease, :meth:`drop` stops
    renewing it. Renewal errors are logged and retried on the next tick (the
    lease is only lost once its TTL passes without a successful renewal).
    """

    def __init__(self, ttl_s: float) -> None:
        self.interval = max(ttl_s / 3.0, 0.05)
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nst-lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def hold(self, key: str, lease: Lease) -> None:
        with self._lock:
            self._leases[key] = lease

    def drop(self, key: str) -> Lease | None:
        with self._lock:
            return self._leases.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                held = list(self._leases.values())
            for lease in held:
                try:
                    if not lease.lost and not lease.renew() and not lease.released:
                        log.warning("lease %s was taken over by another worker", lease.uri)
                except storage.StorageError as exc:
                    log.warning("lease %s not renewed (%s); will retry", lease.uri, exc)
