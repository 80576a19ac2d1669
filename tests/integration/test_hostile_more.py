"""What hostile testing found after the first wave (issue 18), each through the real parts.

Secrets in malformed URIs, the weights hash per row, weights replaced during a run,
a row's device in the batch key, EXIF-heavy JPEGs, `nst export` over files it did not
write, decision files with odd notes, blank manifest lines. The promise each test checks
is listed in docs/reliability.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_secrets import TINY, find_sentinels, object_texts, prefect_texts, run_flow

from nst_core import storage

REPO = Path(__file__).resolve().parents[2]
NST = str(Path(sys.executable).with_name("nst"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# --------------------------------------------------------------------------- 1. secrets in malformed URIs


def _malformed(key: str, secret: str, bucket: str, path: str) -> dict[str, str]:
    """The forms that parse as local paths (or fail to parse) and still carry a credential."""
    query = f"X-Amz-Credential={key}%2F20250101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={secret}"
    return {
        "no-colon": f"s3//{key}:{secret}@{bucket}/{path}",
        "space": f"s3 ://{key}:{secret}@{bucket}/{path}",
        "space-after": f"s3: //{key}:{secret}@{bucket}/{path}",
        "no-scheme": f"{key}:{secret}@{bucket}/{path}",
        "slash-in-secret": f"s3//{key}:{secret[:6]}/{secret[6:]}@{bucket}/{path}",
        "presigned-no-scheme": f"{bucket}.s3.amazonaws.com/{path}?{query}",
    }


@pytest.mark.parametrize("allow_local_paths", [True, False])
def test_credentials_in_malformed_uris_never_leave_any_cell(prefect_server, s3_bucket, sample_images, allow_local_paths):
    key, secret = "SENTKEY" + uuid.uuid4().hex[:12].upper(), "SENTSECRET" + uuid.uuid4().hex
    sentinels = {"key": key, "secret": secret, "secret head": secret[:6] + "/", "secret tail": secret[6:]}
    inputs = f"s3://{s3_bucket}/inputs"
    for name in ("tubingen.jpg", "starry_night.jpg"):
        storage.write_bytes(f"{inputs}/{name}", (sample_images / name).read_bytes(), "image/jpeg")
    content, style = f"{inputs}/tubingen.jpg", f"{inputs}/starry_night.jpg"
    lines = ["id,content_uri,style_uri,weights,init", f"ok,{content},{style},,"]
    for form, uri in _malformed(key, secret, s3_bucket, "inputs/tubingen.jpg").items():
        lines.append(f"content-{form},{uri},{style},,")
        lines.append(f"style-{form},{content},{style}|{uri},,")
        lines.append(f"weights-{form},{content},{style},{uri},")
        lines.append(f"init-{form},{content},{style},,{uri}")
    manifest = f"s3://{s3_bucket}/manifests/malformed.csv"
    storage.write_bytes(manifest, ("\n".join(lines) + "\n").encode())
    output = f"s3://{s3_bucket}/out"

    state, summary = run_flow(manifest_uri=manifest, output_uri=output, allow_local_paths=allow_local_paths)
    assert isinstance(summary, dict), summary
    counts = {k: v for k, v in summary["counts"].items() if v}
    assert counts.get("succeeded") == 1 and sum(counts.values()) == len(lines) - 1, counts
    written = storage.list_prefix(output + "/")
    assert any(u.endswith("/results.parquet") for u in written) and any(u.endswith("/report.html") for u in written)
    prefect, seen = prefect_texts(state.state_details.flow_run_id)
    assert seen["logs"] >= 10 and seen["artifacts"] >= 3, seen
    returned = [("state message", state.message or ""), ("returned summary", repr(summary))]
    hits = find_sentinels([*object_texts(written), *prefect, *returned], sentinels)
    assert hits == [], hits[:10]


def test_nst_stylize_never_prints_a_credential_from_a_malformed_uri(tmp_path, sample_images):
    key, secret = "SENTKEY" + uuid.uuid4().hex[:12].upper(), "SENTSECRET" + uuid.uuid4().hex
    style = str(sample_images / "starry_night.jpg")
    for form, uri in _malformed(key, secret, "bkt", "inputs/tubingen.jpg").items():
        for args in ([uri, style], [str(sample_images / "tubingen.jpg"), style, "--weights", uri],
                     [str(sample_images / "tubingen.jpg"), style, "--init", uri]):  # fmt: skip
            out = subprocess.run([NST, "stylize", *args, "-o", str(tmp_path / "o.png"), "--size", "32", "--iterations", "1",
                                  "--weights" if "--weights" not in args else "--seed", "random:0" if "--weights" not in args else "0"],
                                 capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
            assert out.returncode == 2, (form, args, out.stderr[-500:])
            leaked = find_sentinels([("stdout", out.stdout), ("stderr", out.stderr)], {"key": key, "secret": secret[6:]})
            assert leaked == [], (form, args, out.stderr[-500:])


# --------------------------------------------------------------------------- 2, 3. weights identity


def _state_dict(seed: int):
    from helpers import make_state_dict

    return make_state_dict(seed=seed)


def _samples(folder: Path) -> tuple[str, str, str]:
    """Two content images and a style image of the sample set, as paths."""
    return tuple(str(folder / n) for n in ("tubingen.jpg", "hoovertowernight.jpg", "starry_night.jpg"))  # type: ignore[return-value]


def _local_flow(manifest: Path, output: Path, **kwargs):
    from flows.stylize_manifest import stylize_manifest

    state = stylize_manifest(manifest_uri=str(manifest), output_uri=str(output), defaults=TINY, allow_local_paths=True,
                             retries=0, return_state=True, **kwargs)  # fmt: skip
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), summary
    return _results(summary)


def _results(summary: dict) -> dict[str, dict[str, str]]:
    import io

    import pandas as pd

    frame = pd.read_csv(io.BytesIO(storage.read_bytes(summary["results_csv"])), dtype=str, keep_default_na=False)
    return {row["id"]: row for row in frame.to_dict("records")}


def _meta(row: dict[str, str]) -> dict:
    import json

    return json.loads(storage.read_bytes(storage.join(row["output_uri"].rsplit("/", 1)[0], "meta.json")))


def test_weights_sha256_is_checked_for_every_row_whatever_the_order(prefect_server, tmp_path, sample_images):
    import hashlib
    import shutil

    import torch

    first, second = tmp_path / "w1.pth", tmp_path / "w2.pth"
    torch.save(_state_dict(seed=7), first)
    shutil.copyfile(first, second)  # two URIs: the weights identity was cached per URI
    digest, wrong = hashlib.sha256(first.read_bytes()).hexdigest(), "0" * 64
    tubingen, hoover, starry = _samples(sample_images)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,content_uri,style_uri,weights,weights_sha256\n"
        f"unchecked,{tubingen},{starry},{first},\n"
        f"wrong-after,{tubingen},{starry},{first},{wrong}\n"
        f"wrong-before,{hoover},{starry},{second},{wrong}\n"
        f"right-after,{hoover},{starry},{second},{digest}\n"
    )
    rows = _local_flow(manifest, tmp_path / "out")
    assert {k: r["status"] for k, r in rows.items()} == {
        "unchecked": "succeeded", "wrong-after": "failed", "wrong-before": "failed", "right-after": "succeeded",
    }, {k: (r["status"], r["error"]) for k, r in rows.items()}  # fmt: skip
    for name in ("wrong-after", "wrong-before"):
        assert f"sha256 is {digest}, expected {wrong}" in rows[name]["error"]
    assert _meta(rows["right-after"])["params"]["weights_sha256"] == digest


def test_a_weights_file_replaced_between_runs_of_one_process_is_loaded_again(prefect_server, tmp_path, sample_images):
    import torch

    weights = tmp_path / "vgg.pth"
    torch.save(_state_dict(seed=7), weights)
    tubingen, hoover, starry = _samples(sample_images)
    manifest = tmp_path / "m.csv"

    def run(content: str, weights_file: Path, output: Path) -> dict[str, str]:
        manifest.write_text(f"id,content_uri,style_uri,weights\nr,{content},{starry},{weights_file}\n")
        row = _local_flow(manifest, output)["r"]
        assert row["status"] == "succeeded", row["error"]
        return row

    run(tubingen, weights, tmp_path / "out")  # this process now holds the network of the first file
    replacement = tmp_path / "replacement.pth"
    torch.save(_state_dict(seed=8), replacement)
    replacement.replace(weights)  # the file is replaced (a new inode, as a copy tool does)
    after = run(hoover, weights, tmp_path / "out")
    from nst_core.network import clear_cache

    clear_cache()  # the reference loads the new file from disk, whatever the cache held
    reference = run(hoover, weights, tmp_path / "reference")
    assert after["item_id"] == reference["item_id"]  # named by the new file's bytes, as before
    got, expected = _meta(after)["final_losses"], _meta(reference)["final_losses"]
    assert got["total"] == pytest.approx(expected["total"], rel=1e-4), (got, expected)  # and computed with them


# --------------------------------------------------------------------------- 4. device and precision in the batch key


def test_a_row_runs_on_the_device_it_asked_for_or_fails_alone(prefect_server, tmp_path, sample_images):
    import torch

    tubingen, hoover, starry = _samples(sample_images)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,content_uri,style_uri,device,precision,seed\n"
        f"gpu,{tubingen},{starry},cuda:0,,1\n"
        f"cpu,{tubingen},{starry},cpu,,2\n"
        f"auto,{tubingen},{starry},,,3\n"
        f"cpu-fp32,{hoover},{starry},cpu,fp32,4\n"
        f"gpu-bf16,{hoover},{starry},cuda:0,bf16,5\n"
        f"auto-auto,{hoover},{starry},,,6\n"
    )
    rows = _local_flow(manifest, tmp_path / "out", batch_size=3)
    cuda = torch.cuda.is_available()
    for name in ("gpu", "gpu-bf16"):
        if cuda:
            assert rows[name]["status"] == "succeeded" and _meta(rows[name])["device"].startswith("cuda"), rows[name]
        else:
            assert rows[name]["status"] == "failed" and "CUDA is not available" in rows[name]["error"], rows[name]
    for name in ("cpu", "cpu-fp32", "auto", "auto-auto"):
        assert rows[name]["status"] == "succeeded", rows[name]["error"]
    for name in ("cpu", "cpu-fp32"):
        assert _meta(rows[name])["device"] == "cpu"
    assert _meta(rows["cpu-fp32"])["precision"] == "fp32"
    if cuda:
        assert _meta(rows["gpu-bf16"])["precision"] == "bf16"


# --------------------------------------------------------------------------- 5. JPEGs with many EXIF segments


def _jpeg_with_exif_segments(count: int) -> bytes:
    """A 64x48 JPEG whose EXIF says 'rotate 90°', followed by ``count`` more full-size EXIF segments."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="JPEG", exif=exif.tobytes())
    data = buffer.getvalue()
    first_app1 = data.index(b"\xff\xe1")
    end_of_first = first_app1 + 2 + int.from_bytes(data[first_app1 + 2 : first_app1 + 4], "big")
    filler = b"Exif\0\0" + b"MM\0*" + bytes(65533 - 2 - 10)
    segment = b"\xff\xe1" + (len(filler) + 2).to_bytes(2, "big") + filler
    return data[:end_of_first] + segment * count + data[end_of_first:]


def test_a_jpeg_with_many_exif_segments_is_opened_reading_a_bounded_amount_of_metadata():
    from nst_core import images

    data = _jpeg_with_exif_segments(300)  # ~20 MB of EXIF segments
    assert len(data) > 300 * 65000
    with images._open(data, "exif-heavy.jpg") as opened:  # what Pillow parsed with the header
        assert len(opened.info.get("exif", b"")) < 65536  # one EXIF segment, not 300 concatenated
        assert sum(len(s) for _, s in opened.applist) <= 1 << 20
    assert images.load_image(data, name="exif-heavy.jpg").size == (48, 64)  # the first segment's orientation applies
    assert images.header_size(data) == (48, 64)
    with_icc = _jpeg_with_exif_segments(0)
    assert images.load_image(with_icc).size == (48, 64)


# --------------------------------------------------------------------------- 7, 8. export and review of a stored run


@pytest.fixture(scope="module")
def one_run(prefect_server, tmp_path_factory, sample_images) -> str:
    """The folder of a finished local run with one stylised item (id 'a')."""
    root = tmp_path_factory.mktemp("one-run")
    manifest = root / "m.csv"
    manifest.write_text(f"id,content_uri,style_uri\na,{sample_images / 'tubingen.jpg'},{sample_images / 'starry_night.jpg'}\n")
    rows = _local_flow(manifest, root / "out")
    assert rows["a"]["status"] == "succeeded", rows["a"]["error"]
    (run_folder,) = (root / "out" / "runs").iterdir()
    return str(run_folder)


def _nst(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NST, *args], capture_output=True, text=True, env=_env(), timeout=300)


def test_nst_export_never_overwrites_a_card_or_metadata_it_did_not_write(one_run, tmp_path):
    for name in ("README.md", "metadata.jsonl"):
        dest = tmp_path / f"dest-{name}"
        dest.mkdir()
        (dest / name).write_text("# my own dataset card, written by hand\n")
        out = _nst("export", one_run, str(dest))
        assert out.returncode == 2, out.stdout + out.stderr
        assert name in out.stderr and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert (dest / name).read_text() == "# my own dataset card, written by hand\n"
        assert not (dest / "images").exists()  # refused before anything was written

    dest = tmp_path / "ours"
    assert _nst("export", one_run, str(dest)).returncode == 0
    card = (dest / "README.md").read_text()
    again = _nst("export", one_run, str(dest))  # its own files: exporting again is fine
    assert again.returncode == 0, again.stderr
    assert (dest / "README.md").read_text() == card
    (dest / "README.md").write_text(card + "\nA paragraph the owner added.\n")
    edited = _nst("export", one_run, str(dest))
    assert edited.returncode == 2 and "README.md" in edited.stderr, edited.stderr
    assert (dest / "README.md").read_text().endswith("A paragraph the owner added.\n")


@pytest.mark.parametrize("note", [5, 2.5, ["a", "b"], {"text": "x"}, True])
def test_a_decisions_file_whose_note_is_not_text_is_refused_clearly(one_run, tmp_path, note):
    import json

    from nst_run import review

    path = tmp_path / "decisions.json"
    entries = [{"id": "a", "decision": "keep", "note": "fine"}, {"id": "a", "decision": "reject", "note": note}]
    path.write_text(json.dumps({"format": review.BULK_FORMAT, "reviewer": "ann", "decisions": entries}))
    out = _nst("review", one_run, "--from-file", str(path))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert "entry 2" in out.stderr and "note must be text" in out.stderr, out.stderr
    assert not (Path(one_run) / "decisions").exists()  # a bad file stores nothing


# --------------------------------------------------------------------------- 9. blank lines in the manifest


def test_blank_lines_neither_number_rows_nor_count_towards_max_items(prefect_server, tmp_path, sample_images):
    from nst_run.manifest import parse_manifest

    content, style = sample_images / "tubingen.jpg", sample_images / "starry_night.jpg"
    text = f"id,content_uri,style_uri,iterations\n\n,{content},{style},\n\n\n,{content},{style},-1\n  ,  ,  ,  \n,{content},{style},3\n"
    manifest = parse_manifest(text.encode(), allow_local_paths=True)
    assert [r.row for r in manifest.rows] == [1, 3] and [r.id for r in manifest.rows] == ["1", "3"]
    assert [(bad.row, bad.id, bad.column) for bad in manifest.invalid] == [(2, "2", "iterations")]
    assert [r.row for r in parse_manifest(text.encode(), allow_local_paths=True, max_items=2).rows] == [1]

    path = tmp_path / "blank.csv"
    path.write_text(text)
    out = _nst("validate", str(path))
    assert "row 2, column iterations" in out.stdout + out.stderr, out.stdout + out.stderr
    rows = _local_flow(path, tmp_path / "out", max_items=2)
    assert sorted(rows) == ["1", "2"] and rows["1"]["status"] == "succeeded" and rows["2"]["status"] == "invalid"


# --------------------------------------------------------------------------- 6. signals to `nst run`


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, timeout_s: float, what: str):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGHUP",), ("SIGINT", "SIGINT")])
def test_a_signal_to_nst_run_stops_prefects_temporary_server_too(tmp_path, sample_images, signals):
    import signal
    import time

    tubingen, _hoover, starry = _samples(sample_images)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,content_uri,style_uri\nslow,{tubingen},{starry}\n")
    output = tmp_path / "out"
    env = {k: v for k, v in _env().items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), NST_THREADS="1")
    nst = subprocess.Popen([NST, "run", str(manifest), "-o", str(output), "--set", "size=64", "--set", "iterations=5000",
                            "--set", "weights=random:0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)  # fmt: skip
    server: dict[int, str] = {}
    try:
        # The item is being computed (its lease is there) by a flow on the temporary server (a uvicorn child).
        _wait_for(lambda: any((output / "items").glob("*/.lease")), 300, "the item's lease")
        server = _wait_for(lambda: {p: c for p, c in _descendants(nst.pid).items() if "uvicorn" in c}, 10, "Prefect's server")
        for k, name in enumerate(signals):
            if k:
                time.sleep(1.0)  # the case: a second Ctrl-C a second after the first
            nst.send_signal(getattr(signal, name))
        _stdout, stderr = nst.communicate(timeout=180)
        assert nst.returncode in (130, 128 + getattr(signal, signals[-1])), (nst.returncode, stderr[-2000:])
        assert "can't register atexit" not in stderr, stderr[-2000:]
        assert stderr.count("\n") < 40, stderr[-2000:]
        _wait_for(lambda: not any(_alive(p) for p in server), 60, "Prefect's server to stop")
    finally:
        if nst.poll() is None:
            os.killpg(nst.pid, signal.SIGKILL)
        for pid in server:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- 10. weaker findings


def test_a_random_seed_torch_cannot_take_is_invalid_at_validation():
    from nst_core.network import load_network
    from nst_run.manifest import parse_manifest

    MAX_RANDOM_SEED = 2**63  # torch.Generator().manual_seed takes seeds below this

    rows = "".join(f"s3://bkt/a.jpg,s3://bkt/b.jpg,{w}\n" for w in ("random:99999999999999999999", f"random:{MAX_RANDOM_SEED}", "random:²"))
    manifest = parse_manifest(("content_uri,style_uri,weights\n" + rows + f"s3://bkt/a.jpg,s3://bkt/b.jpg,random:{MAX_RANDOM_SEED - 1}\n").encode())
    assert [(bad.row, bad.column) for bad in manifest.invalid] == [(1, "weights"), (2, "weights"), (3, "weights")]
    assert [r.row for r in manifest.rows] == [4]
    assert load_network(manifest.rows[0].params.weights).weights_id == f"random:{MAX_RANDOM_SEED - 1}"  # the largest seed loads


def test_nst_stylize_refuses_to_write_over_one_of_its_inputs(tmp_path, sample_images):
    import shutil

    content, style = tmp_path / "content.jpg", tmp_path / "style.jpg"
    shutil.copyfile(sample_images / "tubingen.jpg", content)
    shutil.copyfile(sample_images / "starry_night.jpg", style)
    before = content.read_bytes(), style.read_bytes()
    for out in (content, style, tmp_path / "." / "style.jpg"):
        result = _nst("stylize", str(content), str(style), "-o", str(out), "--size", "32", "--iterations", "1", "--weights", "random:0")
        assert result.returncode == 2 and "would be overwritten" in result.stderr, result.stderr
    assert (content.read_bytes(), style.read_bytes()) == before


def _manifest(folder: Path, sample_images: Path, header: str = "content_uri,style_uri") -> Path:
    manifest = folder / "m.csv"
    manifest.write_text(f"{header}\n{sample_images / 'tubingen.jpg'},{sample_images / 'starry_night.jpg'}\n")
    return manifest


@pytest.mark.parametrize("case", ["output-is-a-file", "output-under-a-file", "manifest-without-a-column"])
def test_nst_run_explains_a_refusal_in_one_line_without_prefects_traceback(tmp_path, sample_images, case):
    """Errors nst explains itself (a bad output folder, a manifest it refuses) reach the terminal as its one
    clear line: no Prefect traceback above it, exit 2."""
    a_file = tmp_path / "outfile"
    a_file.write_text("not a folder\n")
    output = {"output-is-a-file": a_file, "output-under-a-file": a_file / "sub"}.get(case, tmp_path / "out")
    header = "content_uri,picture" if case == "manifest-without-a-column" else "content_uri,style_uri"
    manifest = _manifest(tmp_path, sample_images, header)
    result = _nst("run", str(manifest), "-o", str(output), "--set", "size=32", "--set", "iterations=1", "--set", "weights=random:0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr, result.stderr
    clear = [line for line in result.stderr.splitlines() if line.startswith("nst: error:")]
    assert len(clear) == 1, result.stderr
    assert ("style_uri" in clear[0]) if case == "manifest-without-a-column" else (str(a_file) in clear[0] and "not a folder" in clear[0])
    assert a_file.read_text() == "not a folder\n"


def test_a_full_disk_still_leaves_the_results_table_and_a_clear_exit(tmp_path, sample_images):
    """A run whose local output disk fills up (a real 512 KiB tmpfs, mounted in a user namespace): the
    items that fit succeed, the rest fail with "no space left", and the results table is still there
    (room for it was held from the start); exit 1 with one clear line, no traceback; no item without its
    meta.json is reported done."""
    import csv
    import shutil

    from PIL import Image

    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed: no way to mount a small file system without root")
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    manifest = tmp_path / "m.csv"
    rows = [f"r{i},{sample_images / 'tubingen.jpg'},{sample_images / 'starry_night.jpg'},{i}" for i in range(16)]
    manifest.write_text("id,content_uri,style_uri,seed\n" + "\n".join(rows) + "\n")
    run = f"{NST} run {manifest} -o {disk}/out --chunk-size 4 --set size=32 --set iterations=2 --set weights=random:0"
    script = tmp_path / "full.sh"
    script.write_text(
        f"mount -t tmpfs -o size=512k tmpfs {disk} || exit 99\n"
        f"{run} > {tmp_path}/stdout 2> {tmp_path}/stderr; echo $? > {tmp_path}/rc\n"
        f"cp -a {disk}/out {saved}\n"
    )
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", str(script)], env=_env(), timeout=600, capture_output=True, text=True)
    if done.returncode == 99 or not (tmp_path / "rc").exists():
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {done.stderr.strip()[:200]}")
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert int((tmp_path / "rc").read_text()) == 1, stdout + stderr
    assert "Traceback" not in stderr and "no space left" in stdout + stderr, stderr
    (run_folder,) = (saved / "runs").iterdir()
    assert not (run_folder / ".table-reserve").exists()
    with open(run_folder / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["id"] for r in table] == [f"r{i}" for i in range(16)]
    by_status = {s: [r for r in table if r["status"] == s] for s in ("succeeded", "failed")}
    assert len(by_status["succeeded"]) + len(by_status["failed"]) == 16, [r["status"] for r in table]
    assert by_status["succeeded"] and by_status["failed"], [r["status"] for r in table]
    assert all("no space left" in r["error"] for r in by_status["failed"]), [r["error"] for r in by_status["failed"]]
    for row in by_status["succeeded"]:  # done means whole: its metadata and an image that decodes
        item = saved / "items" / row["item_id"]
        assert (item / "meta.json").is_file()
        with Image.open(item / "stylized.png") as image:
            image.load()
