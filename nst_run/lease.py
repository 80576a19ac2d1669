"""Leases: at most one worker computes an item at a time, across concurrent runs.

Two runs of the same manifest (a scheduled run overlapping a manual one, a
re-run started while the first still goes) resolve the same content-addressed
items. Before computing an item a worker takes its lease, a small JSON object
``{item folder}/.lease``::

    {"owner": "<flow run id>", "token": "<uuid4>", "expires_at": <unix time>}

* **Take**: a conditional create (S3 ``PutObject`` with ``If-None-Match: *``;
  locally a hard link that fails when the target exists). Exactly one of
  several concurrent callers wins.
* **Same owner**: a lease already held by the same owner (a Prefect retry of
  the same flow run's task) is simply renewed.
* **Expired**: a worker that dies (SIGKILL, lost machine) stops renewing its
  lease; once ``expires_at`` has passed, the lease is taken over. The takeover
  itself is a conditional create of ``.lease-takeover-{stale token}``, so of
  several workers that see the same stale lease exactly one takes it.
* **Renew**: a :class:`LeaseKeeper` thread rewrites each held lease's expiry
  every ``ttl_s / 3`` while the item is being computed, so the TTL bounds how
  long a dead worker blocks an item, not how long an item may take.
* **Release**: deleting ``.lease`` (and any takeover marker) after the item's
  ``meta.json`` is written. A failed release is harmless: the lease expires.

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
from dataclasses import dataclass
from typing import Any

from nst_core import storage
from nst_run.paths import LEASE_FILE, TAKEOVER_PREFIX

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
    """A lease this worker holds on one item folder."""

    folder: str
    record: LeaseRecord
    ttl_s: float
    takeover_marker: str | None = None
    lost: bool = False

    @property
    def uri(self) -> str:
        return storage.join(self.folder, LEASE_FILE)

    def renew(self, clock: Callable[[], float] = time.time) -> bool:
        """Push the expiry forward if the lease is still ours; False (and ``lost``) when another took it."""
        try:
            current = LeaseRecord.from_bytes(storage.read_bytes(self.uri))
        except storage.ObjectNotFound:
            current = None
        if current is not None and current.token != self.record.token:
            self.lost = True
            return False
        self.record = LeaseRecord(self.record.owner, self.record.token, clock() + self.ttl_s)
        storage.write_bytes(self.uri, self.record.to_bytes(), "application/json")
        return True

    def release(self) -> None:
        """Give the lease up (best effort: a lease that cannot be deleted expires by itself)."""
        try:
            if not self.lost:
                current = LeaseRecord.from_bytes(storage.read_bytes(self.uri))
                if current.token == self.record.token:
                    storage.delete(self.uri)
            if self.takeover_marker:
                storage.delete(self.takeover_marker)
        except storage.StorageError as exc:
            log.debug("lease %s not released (%s); it expires by itself", self.uri, exc)


def acquire(folder: str, owner: str, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time) -> Lease | LeaseRecord:
    """Take the lease of an item folder for ``owner``.

    Returns the :class:`Lease` when ``owner`` now holds it (created, renewed
    because ``owner`` already held it, or taken over from an expired holder),
    else the current holder's :class:`LeaseRecord`. Storage errors propagate.
    """
    uri = storage.join(folder, LEASE_FILE)
    for _ in range(5):  # each turn ends in a decision unless the lease changed hands under us
        mine = LeaseRecord(owner, uuid.uuid4().hex, clock() + ttl_s)
        if storage.write_bytes_if_absent(uri, mine.to_bytes(), "application/json"):
            return Lease(folder, mine, ttl_s)
        try:
            current = LeaseRecord.from_bytes(storage.read_bytes(uri))
        except storage.ObjectNotFound:
            continue  # released between our create and our read: try again
        if current.owner == owner:
            lease = Lease(folder, current, ttl_s)
            lease.renew(clock)
            return lease
        if not current.expired(clock()):
            return current
        marker = storage.join(folder, TAKEOVER_PREFIX + current.token)
        if storage.write_bytes_if_absent(marker, mine.to_bytes(), "application/json"):
            storage.write_bytes(uri, mine.to_bytes(), "application/json")
            return Lease(folder, mine, ttl_s, takeover_marker=marker)
        time.sleep(0.05)  # another worker is taking over this stale lease: read what it wrote
    try:
        return LeaseRecord.from_bytes(storage.read_bytes(uri))
    except storage.ObjectNotFound:
        return LeaseRecord("?", "", 0.0)


def release_owned(folder: str, owner: str) -> bool:
    """Delete the folder's lease if ``owner`` holds it (a lease its task could not release); True if deleted.

    For a run cleaning up after items that failed while storage was unreachable:
    their leases would otherwise block the next run until their TTL passed.
    """
    uri = storage.join(folder, LEASE_FILE)
    try:
        current = LeaseRecord.from_bytes(storage.read_bytes(uri))
    except storage.ObjectNotFound:
        return False
    if current.owner != owner:
        return False
    storage.delete(uri)
    return True


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
                    if not lease.lost and not lease.renew():
                        log.warning("lease %s was taken over by another worker", lease.uri)
                except storage.StorageError as exc:
                    log.warning("lease %s not renewed (%s); will retry", lease.uri, exc)
