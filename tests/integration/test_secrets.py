"""Secrets (issue 8): no credential reaches anything a run produces.

The flow runs against the real SeaweedFS server, whose access key and secret key are
random per session: they are the sentinels, with a Prefect API auth string set for the
run, a presigned-URL signature and a password in manifest cells. Rows fail in the ways
that make error messages (a missing object, a missing weights file, presigned URLs,
user info in a URI, a pasted presigned URL without its scheme), so exceptions are
exercised. Then every object the run wrote, every Prefect artifact, log line, task run
and state of the flow run, and what the flow returned are searched for every sentinel.

The search is shown to work: planted objects (plain and Parquet-compressed) and a
control flow that logs and publishes a sentinel are found by the same code.

Elsewhere: ``test_storage.py`` (storage errors with wrong credentials and presigned URLs),
``test_pipeline.py::test_wrong_credentials_clear_error_without_secret``, and
``test_stack.py`` (the failure webhook payload hides secrets; ``make up`` prints none).
"""

from __future__ import annotations

import base64
import io
import logging
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from nst_core import storage
from nst_core.params import StyleParams

TINY = StyleParams(size=32, iterations=2, weights="random:0", progress_every=1)
FAST = {"retries": 1, "retry_delay_s": 0.2}
SIGNATURE = "SENTINELSIG" + "5f3c" * 8
PASSWORD = "SENTINELPW" + "q7" * 6
AUTH_STRING = "nst:SENTINELAUTH" + "x9" * 8


# --------------------------------------------------------------------------- the search


@pytest.fixture(autouse=True)
def _reset_storage_clients() -> Iterator[None]:
    """The S3 client is cached per process: a test that changes the credentials must not leave it behind."""
    yield
    storage.reset_clients()




def _variants(secret: str) -> set[bytes]:
    """The forms a secret takes when written: as is, URL-encoded, base64 (HTTP basic auth) of itself."""
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    forms.add(base64.b64encode(secret.encode()).decode())
    return {form.encode() for form in forms}


def find_sentinels(sources: Iterable[tuple[str, bytes | str]], sentinels: dict[str, str]) -> list[tuple[str, str]]:
    """(source, sentinel name) for every source that holds a sentinel in any of its forms."""
    patterns = {name: _variants(value) for name, value in sentinels.items()}
    hits = []
    for where, text in sources:
        data = text.encode("utf-8", "replace") if isinstance(text, str) else text
        for name, forms in patterns.items():
            if any(form in data for form in forms):
                hits.append((where, name))
    return hits


def object_texts(uris: Iterable[str]) -> Iterator[tuple[str, bytes | str]]:
    """Each object's bytes, plus what compression hides: Parquet cells, image metadata."""
    for uri in uris:
        data = storage.read_bytes(uri)
        yield uri, data
        if uri.endswith(".parquet"):
            yield uri + " (cells)", pd.read_parquet(io.BytesIO(data)).to_csv()
        if uri.endswith((".png", ".jpg", ".jpeg", ".webp")):
            with Image.open(io.BytesIO(data)) as image:
                yield uri + " (metadata)", repr(image.info) + repr(dict(image.getexif()))


def prefect_texts(flow_run_id: Any, until_event: str | None = None, min_task_runs: int = 0) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Everything Prefect holds about one flow run: the run, its states, task runs, artifacts, logs and
    its ``nst.run.*`` events (``until_event``: wait, up to a minute, until the server has stored that one;
    ``min_task_runs``: likewise until it has recorded that many task runs, which it makes from events
    in the background)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=20)  # logs are sent in batches: all of them first
    texts: list[tuple[str, str]] = []
    with get_client(sync_client=True) as client:
        texts.append(("flow run", client.read_flow_run(flow_run_id).model_dump_json()))
        states = client.read_flow_run_states(flow_run_id)
        texts += [(f"flow run state {s.type.value}", s.model_dump_json(exclude={"data"}) + str(s.message)) for s in states]
        task_runs = _stored(lambda: client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))),
                            lambda found: len(found) >= min_task_runs)  # fmt: skip
        texts += [(f"task run {t.name}", t.model_dump_json()) for t in task_runs]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        texts += [(f"artifact {a.key or a.type}", a.model_dump_json()) for a in artifacts]
        logs = []
        while batch := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(logs)):
            logs += batch
        texts += [(f"log {log.name} {log.level}", log.model_dump_json()) for log in logs]
        events = _nst_events(client, flow_run_id, until_event)
        texts += [(f"event {e.event}", e.model_dump_json()) for e in events]
    counts = {"states": len(states), "task_runs": len(task_runs), "artifacts": len(artifacts), "logs": len(logs), "events": len(events)}
    return texts, counts


def _stored(read: Callable[[], list[Any]], done: Callable[[list[Any]], bool], patience_s: float = 60) -> list[Any]:
    """``read()`` again every half second until ``done`` says the server has stored what is awaited (it
    stores events, and the task runs it makes from them, in the background), or ``patience_s`` passed."""
    import time

    deadline = time.monotonic() + patience_s
    while not done(found := read()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _nst_events(client: Any, flow_run_id: Any, until_event: str | None) -> list[Any]:
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    wanted = EventFilter(event=EventNameFilter(prefix=["nst.run."]), related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]))
    return _stored(lambda: client.read_events(filter=wanted, limit=50).events,
                   lambda events: until_event is None or any(e.event == until_event for e in events))  # fmt: skip


@contextmanager
def verbose_prefect_logs() -> Iterator[None]:
    """Every log record of flow and task runs (down to DEBUG) goes to the API while the block runs."""
    logger = logging.getLogger("prefect")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_flow(**kwargs):
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    from flows.stylize_manifest import stylize_manifest

    with temporary_settings(updates={PREFECT_API_AUTH_STRING: AUTH_STRING}), verbose_prefect_logs():
        state = stylize_manifest(**{**FAST, "defaults": TINY, **kwargs}, return_state=True)
    return state, state.result(raise_on_failure=False)


# --------------------------------------------------------------------------- the runs


def test_a_run_with_failures_leaks_no_credential_anywhere(prefect_server, s3_bucket, s3_server, sample_images):
    sentinels = {
        "AWS access key": s3_server.access_key,
        "AWS secret key": s3_server.secret_key,
        "presigned signature": SIGNATURE,
        "password in a URI": PASSWORD,
        "Prefect auth string": AUTH_STRING,
        "Prefect auth password": AUTH_STRING.split(":", 1)[1],
    }
    assert s3_server.access_key.startswith("NSTTEST") and len(s3_server.secret_key) > 20  # random per session

    inputs = f"s3://{s3_bucket}/inputs"
    for name in ("tubingen.jpg", "starry_night.jpg"):
        storage.write_bytes(f"{inputs}/{name}", (sample_images / name).read_bytes(), "image/jpeg")
    query = (
        "X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={s3_server.access_key}%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
        f"&X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}"
    )
    content, style = f"{inputs}/tubingen.jpg", f"{inputs}/starry_night.jpg"
    rows = [
        ("ok", content, style, ""),
        ("presigned-s3", content, f"{style}?{query}", ""),
        ("presigned-https", content, f"https://{s3_bucket}.s3.amazonaws.com/inputs/starry_night.jpg?{query}", ""),
        ("presigned-no-scheme", f"{s3_bucket}/inputs/tubingen.jpg?{query}", style, ""),
        ("user-info", f"s3://admin:{PASSWORD}@{s3_bucket}/inputs/tubingen.jpg", style, ""),
        ("missing-object", f"{inputs}/missing.jpg", style, ""),
        ("missing-weights", content, style, f"s3://{s3_bucket}/models/missing-vgg19.pth"),
    ]
    manifest = f"s3://{s3_bucket}/manifests/secrets.csv"
    storage.write_bytes(manifest, ("id,content_uri,style_uri,weights\n" + "\n".join(",".join(r) for r in rows) + "\n").encode())
    output = f"s3://{s3_bucket}/out"

    state, summary = run_flow(manifest_uri=manifest, output_uri=output)
    assert isinstance(summary, dict), summary
    counts = {k: v for k, v in summary["counts"].items() if v}
    assert counts == {"succeeded": 1, "failed": 2, "invalid": 4}, counts
    flow_run_id = state.state_details.flow_run_id

    written = storage.list_prefix(output + "/")
    assert any(u.endswith("/meta.json") for u in written) and any(u.endswith("/results.parquet") for u in written)
    assert any(u.endswith("/report.html") for u in written) and any(u.endswith("/loss.csv") for u in written)
    prefect, seen = prefect_texts(flow_run_id, until_event="nst.run.finished", min_task_runs=3)
    assert seen["logs"] >= 10 and seen["artifacts"] >= 3 and seen["task_runs"] >= 3 and seen["events"] >= 2, seen
    assert any("invalid row 2, column style_uri" in text for _, text in prefect)  # the row errors were logged
    returned = [("state message", state.message or ""), ("returned summary", repr(summary))]

    hits = find_sentinels([*object_texts(written), *prefect, *returned], sentinels)
    assert hits == [], hits

    # The errors still say what is wrong, with the address cut before its query or user info.
    results = pd.read_csv(io.BytesIO(storage.read_bytes(summary["results_csv"])), dtype=str, keep_default_na=False).set_index("id")
    assert "take no query string" in results.loc["presigned-s3", "error"] and style in results.loc["presigned-s3", "error"]
    assert "unsupported storage scheme 'https'" in results.loc["presigned-https", "error"]
    assert f"'{s3_bucket}/inputs/tubingen.jpg...'" in results.loc["presigned-no-scheme", "error"]
    assert "***@" in results.loc["user-info", "error"]
    assert f"{inputs}/missing.jpg" in results.loc["missing-object", "error"]
    assert "missing-vgg19.pth" in results.loc["missing-weights", "error"]

    # The search finds what it looks for: planted objects (one hidden in Parquet compression) ...
    planted = {
        f"{output}/control/planted.txt": f"key={s3_server.secret_key}".encode(),
        f"{output}/control/planted.parquet": _parquet_with(SIGNATURE),
    }
    assert not any(form in planted[f"{output}/control/planted.parquet"] for form in _variants(SIGNATURE))  # hidden
    for uri, data in planted.items():
        storage.write_bytes(uri, data)
    try:
        found = find_sentinels(object_texts(storage.list_prefix(output + "/")), sentinels)
        assert sorted(found) == [
            (f"{output}/control/planted.parquet (cells)", "presigned signature"),
            (f"{output}/control/planted.txt", "AWS secret key"),
        ], found
    finally:
        for uri in planted:
            storage.delete(uri)


def _parquet_with(value: str) -> bytes:
    frame = pd.DataFrame({"note": [value * 3] * 200})
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, compression="gzip", write_statistics=False)  # no min/max in clear
    return buffer.getvalue()


def test_the_prefect_search_finds_a_planted_sentinel(prefect_server):
    """A control flow run that logs and publishes a sentinel: found in its logs, artifact and parameters."""
    from prefect import flow, get_run_logger
    from prefect.artifacts import create_markdown_artifact

    planted = "SENTINELCONTROL" + uuid.uuid4().hex

    @flow(name="nst-secrets-control")
    def control(value: str) -> str:
        get_run_logger().info("control line with %s", value)
        create_markdown_artifact(markdown=f"control artifact with {value}", key="secrets-control")
        return "done"

    with verbose_prefect_logs():
        state = control(planted, return_state=True)
    texts, _ = prefect_texts(state.state_details.flow_run_id)
    kinds = {where.split(" ")[0] for where, name in find_sentinels(texts, {"planted": planted})}
    assert {"flow", "artifact", "log"} <= kinds, kinds


def test_a_run_refused_by_s3_leaks_neither_key(prefect_server, s3_bucket, s3_server, monkeypatch):
    """Wrong secret key: the run fails at the manifest with AccessDenied; no key in its error, logs or artifacts."""
    manifest = f"s3://{s3_bucket}/m.csv"
    storage.write_bytes(manifest, b"content_uri,style_uri\ns3://x-bucket/a.jpg,s3://x-bucket/b.jpg\n")
    wrong = "WRONGSENTINEL-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    storage.reset_clients()
    state, error = run_flow(manifest_uri=manifest, output_uri=f"s3://{s3_bucket}/out")
    assert state.is_failed() and isinstance(error, storage.AccessDenied), error
    assert manifest in str(error)
    texts, seen = prefect_texts(state.state_details.flow_run_id)
    assert seen["logs"] >= 1
    assert any("AccessDenied" in text or "credentials" in text for _, text in texts)  # the failure was logged
    sentinels = {"wrong secret": wrong, "AWS secret key": s3_server.secret_key, "AWS access key": s3_server.access_key, "Prefect auth string": AUTH_STRING}
    hits = find_sentinels([*texts, ("error", repr(error) + str(error)), ("state message", state.message or "")], sentinels)
    assert hits == [], hits
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    storage.reset_clients()
    assert storage.list_prefix(f"s3://{s3_bucket}/out/") == []


def test_find_sentinels_matches_encoded_forms():
    secret = "nst-secret-a/b+c=="
    sources = [
        ("plain", f"x {secret} y"),
        ("url", "k=" + urllib.parse.quote(secret, safe="")),
        ("basic auth", "Authorization: Basic " + base64.b64encode(secret.encode()).decode()),
        ("clean", "nothing here"),
    ]
    assert [where for where, _ in find_sentinels(sources, {"s": secret})] == ["plain", "url", "basic auth"]

