"""Faults the pipeline survives, with real parts: S3 outages, a killed worker, refused writes, concurrent runs.

Every test runs the real flow against the session's SeaweedFS server and
Prefect server, with tiny images and retry delays shortened. The promise each
one checks is listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.progress import listening
from nst_core import storage
from nst_run import lease, paths
from nst_run.paths import META_FILE

REPO = Path(__file__).resolve().parents[2]
ITEM_FILES = ("stylized.png", "loss.csv", "loss.png", META_FILE)

# Item durations differ on purpose: the first item finishes quickly, the others are still
# optimising when the fault strikes (a fault is injected when the first meta.json appears).
QUICK, SLOW = 3, 50


def _manifest(bucket: str, uris: dict[str, str], iterations: list[int], name: str = "faults.csv") -> str:
    contents = ["tubingen.jpg", "hoovertowernight.jpg"]
    styles = ["starry_night.jpg", "shipwreck.jpg"]
    lines = ["id,content_uri,style_uri,iterations"]
    for i, its in enumerate(iterations):
        lines.append(f"r{i},{uris[contents[i % 2]]},{uris[styles[(i // 2) % 2]]},{its}")
    uri = f"s3://{bucket}/manifests/{name}"
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode(), "text/csv")
    return uri


def _upload(bucket: str, sample_images: Path) -> dict[str, str]:
    uris = {}
    for name in ("tubingen.jpg", "hoovertowernight.jpg", "starry_night.jpg", "shipwreck.jpg"):
        uris[name] = f"s3://{bucket}/inputs/{name}"
        storage.write_bytes(uris[name], (sample_images / name).read_bytes(), "image/jpeg")
    return uris


def _defaults():
    from nst_core.params import StyleParams

    return StyleParams(size=40, weights="random:0", tolerance=0.0, progress_every=50)


def _run(manifest: str, output: str, **kwargs):
    from flows.stylize_manifest import stylize_manifest

    options = {"defaults": _defaults(), "retries": 3, "retry_delay_s": 1.0, "storage_patience_s": 60.0, **kwargs}
    state = stylize_manifest(manifest_uri=manifest, output_uri=output, return_state=True, **options)
    return state, state.result(raise_on_failure=False)


def _results(summary: dict) -> dict[str, dict]:
    import io

    import pandas as pd

    frame = pd.read_csv(io.BytesIO(storage.read_bytes(summary["results_csv"])), dtype=str, keep_default_na=False)
    return {row["id"]: row for row in frame.to_dict("records")}


def _item_folders(output: str) -> dict[str, set[str]]:
    """item id -> the names of the files in its folder (recursively, relative)."""
    prefix = storage.join(output, "items") + "/"
    found: dict[str, set[str]] = {}
    for uri in storage.list_prefix(prefix):
        item, _, rest = uri[len(prefix) :].partition("/")
        found.setdefault(item, set()).add(rest)
    return found


def _assert_no_item_done_without_its_files(output: str) -> set[str]:
    """Every folder with meta.json holds every output; returns the finished item ids."""
    done = set()
    for item, names in _item_folders(output).items():
        if META_FILE in names:
            assert set(ITEM_FILES) <= names, f"item {item} has meta.json but only {sorted(names)}"
            done.add(item)
    return done


def _when_first_item_is_done(output: str, flow: threading.Thread, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert flow.is_alive(), f"the flow ended before any item was done: {getattr(flow, 'error', None)!r} {getattr(flow, 'summary', None)}"
        try:
            if any(META_FILE in names for names in _item_folders(output).values()):
                return
        except storage.StorageError:
            pass
        time.sleep(0.1)
    raise AssertionError("no item finished in time")


class FlowThread(threading.Thread):
    """Runs the flow in the background and keeps its state and summary."""

    def __init__(self, manifest: str, output: str, **kwargs):
        super().__init__(daemon=True)
        self.args, self.kwargs = (manifest, output), kwargs
        self.state = self.summary = self.error = None

    def run(self) -> None:
        try:
            self.state, self.summary = _run(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def result(self, timeout: float = 300.0):
        self.join(timeout)
        assert not self.is_alive(), "the flow did not finish"
        assert self.error is None, repr(self.error)
        return self.state, self.summary


@pytest.fixture
def s3_samples(prefect_server, s3_bucket, sample_images):
    return s3_bucket, _upload(s3_bucket, sample_images)


def test_s3_outage_mid_run_is_ridden_out_by_retries(s3_samples, s3_server):
    bucket, uris = s3_samples
    manifest, output = _manifest(bucket, uris, [QUICK, SLOW, SLOW, SLOW]), f"s3://{bucket}/out"
    flow = FlowThread(manifest, output, retries=7, retry_delay_s=0.5)  # retried for up to 64 s
    flow.start()
    _when_first_item_is_done(output, flow)
    s3_server.stop()
    try:
        time.sleep(4)
    finally:
        s3_server.start()
    state, summary = flow.result()
    assert state.is_completed(), state.message
    assert summary["counts"]["succeeded"] == 4, summary["counts"]
    assert len(_assert_no_item_done_without_its_files(output)) == 4


def test_s3_outage_past_the_retry_budget_fails_items_and_a_rerun_completes_them(s3_samples, s3_server):
    bucket, uris = s3_samples
    manifest, output = _manifest(bucket, uris, [QUICK, SLOW, SLOW, SLOW]), f"s3://{bucket}/out"
    flow = FlowThread(manifest, output, retries=0, retry_delay_s=0.2)
    first_row_settled, every_row_settled = threading.Event(), threading.Event()

    def on_progress(progress) -> None:  # flows.progress, in this process
        if progress.done >= 1:
            first_row_settled.set()
        if progress.done >= progress.total:
            every_row_settled.set()

    with listening(on_progress):
        flow.start()
        # S3 goes down once a task run has settled its rows, not at the first item's meta.json: on a CPU
        # two SLOW rows share one task run, and an outage between their stores would fail the task with
        # one of them stored (reported succeeded, read off its meta.json once storage answers:
        # tests/unit/test_failed_task_outcomes.py), so which rows fail would be left to chance. The rows
        # of a failed task settle once storage answers or storage_patience_s (60 s here) has passed.
        assert first_row_settled.wait(240), f"no row settled in time: {flow.error!r}"
        s3_server.stop()
        try:  # S3 stays down until the slow items have finished optimising, failed to store and have no retries left
            assert every_row_settled.wait(300), "the slow items never settled while S3 was down"
        finally:
            s3_server.start()
        state, summary = flow.result()  # the run's own results are written once S3 is back (storage_patience_s)
    assert state.is_failed()
    rows = _results(summary)
    failed = {i for i, r in rows.items() if r["status"] == "failed"}
    assert failed and {r["status"] for i, r in rows.items() if i not in failed} == {"succeeded"}, rows
    for i in failed:
        assert "try again later" in rows[i]["error"], rows[i]["error"]  # the storage error, as transient
    done_before = _assert_no_item_done_without_its_files(output)
    # The run released the leases its failed tasks could not (S3 was down then), so a re-run need not wait.
    assert not [n for names in _item_folders(output).values() for n in names if n == paths.LEASE_FILE]

    state, summary = _run(manifest, output, retries=0, lease_wait_s=0.0)
    assert state.is_completed(), state.message
    again = _results(summary)
    assert {r["item_id"] for r in again.values() if r["status"] == "cached"} == done_before
    # Every failed row is done now: computed again, or found stored by the first run. The second happens
    # when a task stored one item and failed on the next as S3 went down: storage, down for the whole
    # storage_patience_s, could not say the first was stored, so the run reported it failed (nothing is
    # taken for finished unread), and the re-run finds it complete. Which rows share a task depends on
    # the run's pace, so either may happen; an item not stored must be computed again.
    assert {i for i, r in again.items() if r["status"] == "succeeded"} == {i for i in failed if rows[i]["item_id"] not in done_before}
    assert {r["status"] for r in again.values()} <= {"succeeded", "cached"}
    assert len(_assert_no_item_done_without_its_files(output)) == 4


_WORKER = """
import sys
from flows.stylize_manifest import stylize_manifest
from nst_core.params import StyleParams
stylize_manifest(manifest_uri=sys.argv[1], output_uri=sys.argv[2], lease_ttl_s=3.0, retries=0,
                 defaults=StyleParams(size=40, weights="random:0", tolerance=0.0, progress_every=50))
"""


def test_a_killed_worker_leaves_no_item_half_done_and_a_rerun_finishes_exactly_the_rest(s3_samples):
    from prefect.settings import PREFECT_API_URL

    bucket, uris = s3_samples
    manifest, output = _manifest(bucket, uris, [QUICK, QUICK, 400, 400]), f"s3://{bucket}/out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "NST_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, manifest, output], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        # Kill it while an item is being optimised: its lease is there, its meta.json is not.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            folders = _item_folders(output)
            busy = [i for i, names in folders.items() if paths.LEASE_FILE in names and META_FILE not in names]
            if busy and sum(META_FILE in names for names in folders.values()) >= 2:
                break
            assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        else:
            raise AssertionError("the worker never reached its third item")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    finished = _assert_no_item_done_without_its_files(output)
    assert len(finished) == 2
    metas = {item: storage.read_bytes(storage.join(output, "items", item, META_FILE)) for item in finished}

    # The dead worker's lease blocks its item until the TTL passes without a heartbeat; then it is taken over.
    state, summary = _run(manifest, output, retries=0, lease_wait_s=60.0)
    assert state.is_completed(), state.message
    rows = _results(summary)
    assert {r["item_id"] for r in rows.values() if r["status"] == "cached"} == finished
    assert sorted(r["status"] for r in rows.values()) == ["cached", "cached", "succeeded", "succeeded"]
    assert len(_assert_no_item_done_without_its_files(output)) == 4
    for item, before in metas.items():  # finished items were not redone
        assert storage.read_bytes(storage.join(output, "items", item, META_FILE)) == before
    assert not [n for names in _item_folders(output).values() for n in names if n.startswith(paths.LEASE_FILE)]


def test_a_write_refused_part_way_fails_the_item_and_leaves_nothing_that_looks_finished(prefect_server, tmp_path, sample_images):
    # A directory where loss.png must go: the filesystem refuses that write after stylized.png and
    # loss.csv were written (as a permission or quota error would, which root does not get here).
    from nst_run.items import ItemPaths

    manifest = tmp_path / "m.csv"
    samples = {n: str(sample_images / n) for n in ("tubingen.jpg", "hoovertowernight.jpg", "starry_night.jpg", "shipwreck.jpg")}
    manifest.write_text(
        "id,content_uri,style_uri\n"
        f"blocked,{samples['tubingen.jpg']},{samples['starry_night.jpg']}\n"
        f"fine,{samples['hoovertowernight.jpg']},{samples['shipwreck.jpg']}\n"
    )
    output = tmp_path / "out"
    options = {"defaults": _defaults().with_overrides(iterations=3), "allow_local_paths": True, "retries": 0}
    from nst_run.manifest import load_manifest
    from nst_run.planning import resolve_items

    rows = load_manifest(str(manifest), defaults=options["defaults"], allow_local_paths=True).rows
    blocked = resolve_items(rows[:1], str(output), False)[0]
    (Path(ItemPaths(str(output), blocked.item_id).loss_png)).mkdir(parents=True)

    state, summary = _run(str(manifest), str(output), **options)
    assert state.is_failed()
    rows = _results(summary)
    assert rows["fine"]["status"] == "succeeded"
    assert rows["blocked"]["status"] == "failed"
    assert "could not store the outputs" in rows["blocked"]["error"] and "loss.png" in rows["blocked"]["error"]
    folder = output / "items" / blocked.item_id
    assert not (folder / META_FILE).exists()  # not done, so a re-run redoes it
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]  # no temporary leftovers
    assert not (folder / paths.LEASE_FILE).exists()


def test_two_runs_of_one_manifest_at_once_compute_each_item_once(s3_samples):
    bucket, uris = s3_samples
    manifest, output = _manifest(bucket, uris, [40, 40, 40, 40]), f"s3://{bucket}/out"
    runs = [FlowThread(manifest, output, retries=0, lease_wait_s=120.0) for _ in range(2)]
    for run in runs:
        run.start()
    results = [run.result() for run in runs]
    for state, _ in results:
        assert state.is_completed(), state.message
    tables = [_results(summary) for _, summary in results]
    computed: dict[str, int] = {}
    for table in tables:
        for row in table.values():
            assert row["status"] in ("succeeded", "done_elsewhere", "cached"), row
            if row["status"] == "succeeded":
                computed[row["item_id"]] = computed.get(row["item_id"], 0) + 1
    assert sorted(computed.values()) == [1, 1, 1, 1], computed  # each item computed to completion once
    assert len(_assert_no_item_done_without_its_files(output)) == 4
    owners = {json.loads(storage.read_bytes(storage.join(output, "items", item, META_FILE)))["run_owner"] for item in computed}
    assert owners <= {str(state.state_details.flow_run_id) for state, _ in results}


def test_a_lease_has_one_winner_and_an_expired_one_is_taken_over_once(s3_bucket):
    folder = f"s3://{s3_bucket}/items/abc"
    now = [1000.0]
    first = lease.acquire(folder, "run-a", ttl_s=10, clock=lambda: now[0])
    assert isinstance(first, lease.Lease)
    second = lease.acquire(folder, "run-b", ttl_s=10, clock=lambda: now[0])
    assert isinstance(second, lease.LeaseRecord) and second.owner == "run-a"
    again = lease.acquire(folder, "run-a", ttl_s=10, clock=lambda: now[0])  # a retry of the same run
    assert isinstance(again, lease.Lease) and again.record.token == first.record.token

    now[0] += 11  # run-a stopped renewing: its lease expired
    winners = []
    barrier = threading.Barrier(4)

    def contend(name: str) -> None:
        barrier.wait()
        got = lease.acquire(folder, name, ttl_s=10, clock=lambda: now[0])
        if isinstance(got, lease.Lease):
            winners.append(got)

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert not first.renew(clock=lambda: now[0]) and first.lost  # the old holder learns it lost the lease
    winners[0].release()
    assert not storage.list_prefix(folder + "/")


def _out_of_memory(kind: str) -> RuntimeError:
    import torch

    if kind == "allocator":
        return torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` (simulated)")


def test_only_out_of_memory_errors_are_taken_for_out_of_memory():
    from nst_run.execute import out_of_memory

    assert out_of_memory(_out_of_memory("allocator")) and out_of_memory(_out_of_memory("cublas"))
    assert out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not out_of_memory(ValueError("CUDA out of memory"))  # not an error PyTorch raises for it


@pytest.mark.parametrize("kind", ["allocator", "cublas"])
def test_an_out_of_memory_batch_is_halved_once_then_the_item_fails_alone(prefect_server, tmp_path, sample_images, monkeypatch, kind):
    # A CPU cannot run out of GPU memory on demand: the engine call raises what CUDA would (PyTorch's
    # allocator: torch.OutOfMemoryError; cuBLAS's handle or workspace: a RuntimeError) for any batch
    # holding the item marked "huge"; everything else runs the real engine.
    import nst_run.execute as task_module

    original = task_module.engine.stylize_batch
    seen: list[int] = []

    def fits_unless_huge(jobs, **kwargs):
        seen.append(len(jobs))
        if any(job.params.seed == 2 for job in jobs):
            raise _out_of_memory(kind)
        return original(jobs, **kwargs)

    monkeypatch.setattr(task_module.engine, "stylize_batch", fits_unless_huge)
    content, style = sample_images / "tubingen.jpg", sample_images / "starry_night.jpg"
    from nst_core.params import StyleParams

    # Four items that batch together (the seed is free within a batch); seed 2 marks the one that does not fit.
    defaults = StyleParams(size=32, iterations=2, weights="random:0")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,content_uri,style_uri,seed\n" + "".join(f"r{i},{content},{style},{i + 1}\n" for i in range(4)))
    state, summary = _run(str(manifest), str(tmp_path / "out"), defaults=defaults, allow_local_paths=True, batch_size=4, retries=0)
    rows = _results(summary)
    # The batch of four, its first half, that half's items one by one, then the second half.
    assert seen == [4, 2, 1, 1, 2], seen
    assert rows["r1"]["status"] == "failed" and rows["r1"]["error"] == "out_of_memory"
    assert [rows[i]["status"] for i in ("r0", "r2", "r3")] == ["succeeded"] * 3
    assert state.is_failed()


def test_an_upload_blip_is_retried_in_place_and_the_engine_runs_once(s3_samples, s3_server, monkeypatch):
    """S3 goes away right after the optimisation: the item's writes wait for it in place (old code: the
    task failed, Prefect retried it, and the optimisation ran again)."""
    import nst_run.execute as execute

    bucket, uris = s3_samples
    manifest, output = _manifest(bucket, uris, [QUICK]), f"s3://{bucket}/out"
    runs: list[int] = []
    real = execute._optimise_and_judge

    def optimise_then_lose_storage(*args):  # the real engine; storage drops out as it returns
        results = real(*args)
        runs.append(len(results))
        s3_server.stop()
        threading.Timer(3.0, s3_server.start).start()
        return results

    monkeypatch.setattr(execute, "_optimise_and_judge", optimise_then_lose_storage)
    state, summary = _run(manifest, output, retries=5, retry_delay_s=1.0)  # 1, 2, 4, 8, 16 s in place
    assert state.is_completed(), state.message
    assert summary["counts"]["succeeded"] == 1
    assert runs == [1]  # one optimisation, not one per task attempt
    assert len(_assert_no_item_done_without_its_files(output)) == 1


def test_a_rerun_reads_no_input_it_already_hashed_and_a_changed_one_is_hashed_again(s3_samples, monkeypatch):
    """Inputs are identified by their record (URI, version, size) under the output prefix: a second
    resolve reads no image; a rewritten object has a new ETag, so it is hashed again, never taken for the old."""
    from nst_core.params import StyleParams
    from nst_run import planning
    from nst_run.manifest import load_manifest

    bucket, uris = s3_samples
    manifest, output = _manifest(bucket, uris, [QUICK, QUICK]), f"s3://{bucket}/out"
    rows = load_manifest(manifest, defaults=StyleParams(size=40, weights="random:0")).rows
    hashed: list[str] = []
    real = storage.sha256_stream
    monkeypatch.setattr(storage, "sha256_stream", lambda uri, *a, **k: hashed.append(str(uri)) or real(uri, *a, **k))
    first = planning.resolve_items(rows, output, force=False)
    assert sorted(hashed) == sorted({*rows[0].input_uris().values(), *rows[1].input_uris().values()})  # each once
    hashed.clear()
    again = planning.resolve_items(rows, output, force=False)
    assert hashed == [] and [w.item_id for w in again] == [w.item_id for w in first]
    assert [w.content_size for w in again] == [w.content_size for w in first] != [None, None]
    storage.write_bytes(uris["tubingen.jpg"], storage.read_bytes(uris["shipwreck.jpg"]), "image/jpeg")
    changed = planning.resolve_items(rows, output, force=False)
    assert hashed == [uris["tubingen.jpg"]]
    assert changed[0].input_sha256["content"] == storage.sha256_bytes(storage.read_bytes(uris["shipwreck.jpg"]))
    assert changed[0].item_id != first[0].item_id and changed[1].item_id == first[1].item_id
