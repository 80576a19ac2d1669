"""The rows of a task that failed for good (nst_run.execute.FailedTasks, outcomes_of_failed_task): a
task stores its items one after another, so an item it finished before failing is reported as finished,
read off its ``meta.json``; the others fail with the task's reason. Real engine, real (local) storage;
storage that does not answer is tested with a real S3 server stopped (tests/integration/test_faults.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from helpers import sample_image

from nst_core import engine
from nst_core.params import StyleParams
from nst_run import lease
from nst_run.execute import FailedTasks, _fetch_images, _job, _store, outcomes_of_failed_task, release_failed_leases
from nst_run.manifest import parse_manifest
from nst_run.paths import LEASE_FILE, ItemPaths
from nst_run.planning import resolve_items


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
    release_failed_leases([o for o in outcomes if o.status == "failed"], out, "this-run", patience_s=5.0)  # what the flow does next
    assert not (tmp_path / "out" / "items" / held.item_id / LEASE_FILE).exists()  # freed for the next run
