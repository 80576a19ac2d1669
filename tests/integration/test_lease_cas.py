"""Leases are compare-and-swap: no transition undoes another (docs/reliability.md, "item leases").

Every test runs on local storage and on the session's real SeaweedFS server. The
first two interleave a heartbeat with a takeover or a release at the one moment
that matters (between the heartbeat's read and its write: the clock a renewal
calls sits there in the old code); the others are many contenders with short
TTLs and a slowed heartbeat, checked by what is stored at the end and by a
watcher that would see a lease come back to a holder it was taken from.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from nst_core import storage
from nst_run import lease


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty folder for item leases: a local directory, or a prefix in a fresh SeaweedFS bucket."""
    if request.param == "local":
        return str(tmp_path / "items")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/items"


def _lease_files(base: str) -> list[str]:
    return [uri for uri in storage.list_prefix(base + "/") if uri.rsplit("/", 1)[-1].startswith(lease.LEASE_FILE)]


def _token(folder: str) -> str | None:
    try:
        return lease.LeaseRecord.from_bytes(storage.read_bytes(storage.join(folder, lease.LEASE_FILE))).token
    except storage.ObjectNotFound:
        return None


def test_a_renewal_never_overwrites_another_workers_takeover(base: str) -> None:
    folder = storage.join(base, "item-1")
    now = [1000.0]
    held = lease.acquire(folder, "run-a", ttl_s=10, clock=lambda: now[0])
    assert isinstance(held, lease.Lease)
    taker: list[lease.Lease | lease.LeaseRecord] = []

    def stalled_heartbeat() -> float:
        # run-a's heartbeat stalls past its TTL (a frozen VM); meanwhile run-b takes the expired lease over.
        if not taker:
            now[0] += 11
            taker.append(lease.acquire(folder, "run-b", ttl_s=10, clock=lambda: now[0]))
        return now[0]

    renewed = held.renew(clock=stalled_heartbeat)
    assert isinstance(taker[0], lease.Lease), taker[0]
    assert _token(folder) == taker[0].record.token  # run-b's takeover stands
    assert renewed is False and held.lost  # run-a learns it lost the lease instead of writing over it
    assert taker[0].renew(clock=lambda: now[0])
    held.release()  # the loser's release leaves the winner's lease alone
    assert _token(folder) == taker[0].record.token
    taker[0].release()
    assert _lease_files(base) == []


def test_a_renewal_never_brings_back_a_released_lease(base: str) -> None:
    folder = storage.join(base, "item-1")
    held = lease.acquire(folder, "run-a", ttl_s=10)
    assert isinstance(held, lease.Lease)
    released: list[bool] = []

    def heartbeat_clock() -> float:
        # The run frees the lease (release_owned, as the flow does for failed items) while the heartbeat renews it.
        if not released:
            released.append(lease.release_owned(folder, "run-a"))
        return time.time()

    renewed = held.renew(clock=heartbeat_clock)
    assert released == [True]
    assert _lease_files(base) == []  # not re-created
    assert renewed is False and held.lost


def _slow_clock(rng: random.Random, lock: threading.Lock, stall_s: float) -> float:
    """A heartbeat's clock that sometimes stalls (a descheduled thread, a GC pause) before answering."""
    with lock:
        delay = rng.uniform(0, stall_s)
    time.sleep(delay)
    return time.time()


class _SlowedHeartbeat:
    """What the keeper holds: the real lease, renewed through a clock that stalls up to ``stall_s``."""

    def __init__(self, held: lease.Lease, rng: random.Random, lock: threading.Lock, stall_s: float) -> None:
        self._lease, self._rng, self._lock, self._stall_s = held, rng, lock, stall_s

    def __getattr__(self, name: str):
        return getattr(self._lease, name)

    def renew(self, clock=None) -> bool:
        return self._lease.renew(clock=lambda: _slow_clock(self._rng, self._lock, self._stall_s))


def test_leases_released_at_random_times_under_a_running_keeper_leave_none_behind(base: str) -> None:
    count = 400 if base.startswith("/") else 120
    rng, rng_lock = random.Random(18), threading.Lock()
    folders = [storage.join(base, f"item-{i:04d}") for i in range(count)]
    with lease.LeaseKeeper(ttl_s=0.15) as keeper:  # renews every 0.05 s, as the reproduction did
        assert keeper.interval == pytest.approx(0.05)
        for i, folder in enumerate(folders):
            held = lease.acquire(folder, "run-a", ttl_s=30)
            assert isinstance(held, lease.Lease)
            keeper.hold(str(i), _SlowedHeartbeat(held, rng, rng_lock, stall_s=0.002))  # type: ignore[arg-type]
        order = list(range(count))
        rng.shuffle(order)

        def release(share: list[int]) -> None:
            for i in share:
                time.sleep(rng.uniform(0, 0.01))
                dropped = keeper.drop(str(i))  # what stylize_items does when an item ends
                assert dropped is not None
                dropped.release()

        threads = [threading.Thread(target=release, args=(order[k::8],)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The keeper still runs: a renewal it started before the drop must not resurrect any of them.
        time.sleep(keeper.interval * 3)
    left = _lease_files(base)
    assert left == [], f"{len(left)} of {count} leases left behind: {left[:5]}"


def test_many_contenders_with_short_ttls_and_a_slowed_heartbeat_never_resurrect_a_lease(base: str) -> None:
    local = base.startswith("/")
    n_folders, n_contenders, ttl_s = (12, 4, 0.2) if local else (6, 3, 0.4)
    duration_s = 3.0 if local else 5.0
    folders = [storage.join(base, f"item-{i}") for i in range(n_folders)]
    rng, rng_lock = random.Random(7), threading.Lock()
    stop = threading.Event()
    holds: list[int] = []
    failures: list[BaseException] = []

    def contender(name: str) -> None:
        try:
            while not stop.is_set():
                with rng_lock:
                    folder = rng.choice(folders)
                    hold_s = rng.uniform(0, 2 * ttl_s)
                got = lease.acquire(folder, name, ttl_s=ttl_s)
                if not isinstance(got, lease.Lease):
                    time.sleep(ttl_s / 10)
                    continue
                holds.append(1)
                end = time.monotonic() + hold_s
                # Its own heartbeat, renewing every third of the TTL through a clock that may stall past the TTL.
                while time.monotonic() < end and got.renew(clock=lambda: _slow_clock(rng, rng_lock, 1.5 * ttl_s)):
                    time.sleep(ttl_s / 3)
                got.release()
        except BaseException as exc:  # reported by the test, not lost in a thread
            failures.append(exc)

    # The watcher: the sequence of tokens each lease file held. A token is one grant; once another
    # grant replaced it, it must never come back (that would be a renewal writing over a takeover).
    seen: dict[str, list[str]] = {folder: [] for folder in folders}

    def watch() -> None:
        while not stop.is_set():
            for folder in folders:
                token = _token(folder)
                if token is not None and (not seen[folder] or seen[folder][-1] != token):
                    seen[folder].append(token)

    threads = [threading.Thread(target=contender, args=(f"run-{k}",)) for k in range(n_folders * n_contenders // 3)]
    threads.append(threading.Thread(target=watch))
    for thread in threads:
        thread.start()
    time.sleep(duration_s)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[0]
    assert len(holds) > n_folders  # the leases did change hands
    resurrected = {f: tokens for f, tokens in seen.items() if len(tokens) != len(set(tokens))}
    assert not resurrected, f"a lease came back to a holder it had been taken from: {resurrected}"
    left = _lease_files(base)
    assert left == [], f"leases left behind: {left}"


def test_conditional_replace_and_delete_act_only_on_the_state_read(base: str) -> None:
    # On SeaweedFS this is the check that the server honours If-Match on PutObject and DeleteObject
    # (a server that ignored it would let the stale writes below through).
    uri = storage.join(base, "item-1", lease.LEASE_FILE)
    first = storage.create_versioned(uri, b"one")
    assert first is not None and storage.create_versioned(uri, b"again") is None
    second = storage.replace_if_version(uri, b"two", first)
    assert second is not None and second != first
    assert storage.replace_if_version(uri, b"stale", first) is None
    assert storage.delete_if_version(uri, first) is False
    assert storage.read_versioned(uri) == (b"two", second)
    assert storage.delete_if_version(uri, second) is True
    assert storage.replace_if_version(uri, b"back", second) is None  # a replace never re-creates
    assert not storage.exists(uri)
