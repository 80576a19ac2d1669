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

from nst_core import storage
from test_secrets import TINY, find_sentinels, object_texts, prefect_texts, run_flow

REPO = Path(__file__).resolve().parents[1]
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
