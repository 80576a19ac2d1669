"""The rows of a task that failed for good (nst_run.execute.FailedTasks, outcomes_of_failed_task): a
task stores its items one after another, so an item it finished before failing is reported as finished,
read off its ``meta.json``; the others fail with the task's reason. Real engine, real (local) storage;
storage that does not answer is tested with a real S3 server stopped (tests/integration/test_faults.py)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

from helpers import sample_image

from nst_core import engine, storage
from nst_core.params import StyleParams
from nst_run import lease
from nst_run.execute import FailedTasks, LeaseReleases, _fetch_images, _job, _store, outcomes_of_failed_task
from nst_run.manifest import parse_manifest
from nst_run.paths import LEASE_FILE, ItemPaths
from nst_run.planning import Outcome, resolve_items


def test_stored_items_of_a_failed_task_are_finished_and_the_rest_failed_with_their_leases_freed(tmp_path):
    pairs = [("tubingen.jpg", "starry_night.jpg"), ("tubingen.jpg", "shipwreck.jpg"), ("hoovertowernight.jpg", "starry_night.jpg"), ("hoovertowernight.jpg", "shipwreck.jpg")]
    csv = "content_uri,style_uri\n" + "\n".join(f"{sample_image(c)},{sample_image(s)}" for c, s in pairs)
    defaults = StyleParams(size=32, iterations=2, weights="random:0", device="cpu", tolerance=0)
    manifest = parse_manifest(csv.encode(), defaults=defaults, base_dir=str(tmp_path))
    out = str(tmp_path / "out")
    works = resolve_items(manifest.rows, out, force=False)
    assert len({w.item_id for w in works}) == 4
    mine, elsewhere, held, unreadable = works
    for work, owner in ((mine, "this-run"), (elsewhere, "another-run")):
        (result,) = engine.stylize_batch([_job(work, _fetch_images(work))])
        _store(work, out, result, owner=owner)
    assert isinstance(lease.acquire(ItemPaths(out, held.item_id).folder, "this-run", 600.0), lease.Lease)  # computing when it failed
    broken = tmp_path / "out" / "items" / unreadable.item_id
    broken.mkdir(parents=True)
    (broken / "meta.json").write_text("{not json")  # not a finished item's mark

    with ThreadPoolExecutor(1) as executor:
        failed_tasks = FailedTasks(out, "this-run", executor)
        failed_tasks.add(works[:2], "storage unreachable")
        failed_tasks.add(works[2:], "storage unreachable")
        outcomes = failed_tasks.ready(wait=True) + failed_tasks.finish(patience_s=5.0)

    assert [o.status for o in outcomes] == ["succeeded", "done_elsewhere", "failed", "failed"]
    assert [o.row for o in outcomes] == [w.row.row for w in works]
    assert outcomes[0].output_uri == ItemPaths(out, mine.item_id).image and not outcomes[0].error
    assert outcomes[2].error == outcomes[3].error == "storage unreachable"
    assert outcomes_of_failed_task(works, "again", out, "this-run", patience_s=0.0)[2].error == "again"  # read as often as asked
    with ThreadPoolExecutor(1) as executor:  # what the flow does next
        releases = LeaseReleases(out, "this-run", 5.0, executor)
        releases.add(outcomes)
        releases.finish()
    assert not (tmp_path / "out" / "items" / held.item_id / LEASE_FILE).exists()  # freed for the next run


def test_an_outage_costs_the_lease_releases_one_patience_not_one_per_item(monkeypatch):
    """Storage down (a real S3 client, its endpoint a closed port on 127.0.0.1): the first release waits the
    run's storage patience, retrying; the releases after it try once each (their leases expire by
    themselves), instead of waiting the patience again per item. Attempts are counted on the real call."""
    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage.reset_clients()
    attempts: dict[str, int] = {}
    real = lease.release_owned

    def counted(folder: str, owner: str) -> bool:
        attempts[folder] = attempts.get(folder, 0) + 1
        return real(folder, owner)

    monkeypatch.setattr(lease, "release_owned", counted)
    out = "s3://nst-down/out"
    failed = [Outcome(row=r, id=f"row{r}", status="failed", item_id=f"item{r}", error="storage unreachable") for r in range(1, 6)]
    try:
        with ThreadPoolExecutor(1) as executor:
            releases = LeaseReleases(out, "this-run", 1.0, executor)
            releases.add(failed[:2])
            releases.add(failed[2:])  # a later task's failures: the outage is still the same one
            releases.finish()
    finally:
        storage.reset_clients()
    tries = [attempts[ItemPaths(out, o.item_id).folder] for o in failed]
    assert tries[0] >= 2  # waited and retried within the patience
    assert tries[1:] == [1, 1, 1, 1]
