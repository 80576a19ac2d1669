"""Operations the Prefect way, against a real Prefect server (the session's ``prefect_server``).

* ``prefect.yaml`` at the repo root is generated from ``nst_cli/serve.py``'s one declaration, and
  ``prefect deploy`` and ``nst serve`` store the same deployments;
* the scheduled deployment runs one at a time (concurrency limit 1, ``CANCEL_NEW``), enforced by
  the server's orchestration;
* the server-side alerts (``nst_cli/alerts.py``) POST to a real HTTP listener on 127.0.0.1: on a
  failed run of the flow, and on a scheduled run that is not finished by its deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Webhook

REPO = Path(__file__).resolve().parents[2]
FLOW = "stylize_manifest"
SCHEDULE = {"NST_SCHEDULE_MANIFEST": "s3://nst/manifests/samples.csv", "NST_SCHEDULE_OUTPUT": "s3://nst/outputs/nightly"}


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A child process pointed at the session's server (its own PREFECT_HOME, no webhook unless given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NST_"))}
    env.update(PREFECT_API_URL=_api_url(), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PYTHONPATH=str(REPO), NST_CODE_DIR=str(REPO), **SCHEDULE, **extra)  # fmt: skip
    return env


def _stored(name: str) -> dict[str, Any]:
    """What the server stores for deployment ``stylize_manifest/name`` (the fields the declaration sets)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"{FLOW}/{name}")
    return {
        "id": str(dep.id),
        "description": dep.description,
        "tags": sorted(dep.tags),
        "parameters": dep.parameters,
        "enforce_parameter_schema": dep.enforce_parameter_schema,
        "schedules": [(s.schedule.cron, s.schedule.timezone, s.active, s.parameters) for s in dep.schedules],
        "concurrency_limit": dep.global_concurrency_limit.limit if dep.global_concurrency_limit else None,
        "collision_strategy": dep.concurrency_options.collision_strategy.value if dep.concurrency_options else None,
    }


def _ensure_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


@pytest.fixture(scope="module")
def deployed(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The repository's prefect.yaml applied with `prefect deploy --all` to the session's server."""
    from nst_cli.serve import WORK_POOL

    tmp = tmp_path_factory.mktemp("deploy")
    _ensure_process_pool(WORK_POOL)
    result = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"], cwd=REPO,
                            env=_cli_env(tmp), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {name: _stored(name) for name in ("adhoc", "scheduled")}


# ----------------------------------------------------------------------------- one declaration


def test_the_repository_prefect_yaml_is_the_generated_one() -> None:
    from nst_cli.serve import render_prefect_yaml

    path = REPO / "prefect.yaml"
    assert path.is_file(), "prefect.yaml belongs at the repository root, where `prefect deploy` looks"
    assert path.read_text() == render_prefect_yaml(), "prefect.yaml differs from nst_cli/serve.py: run `make prefect.yaml`"
    assert not (REPO / "infra" / "prefect.yaml").exists(), "a second copy of the deployments"


def test_prefect_deploy_stores_what_the_declaration_says(deployed: dict[str, dict[str, Any]]) -> None:
    from nst_cli.serve import deployment_specs

    specs = {s.name: s for s in deployment_specs(SCHEDULE["NST_SCHEDULE_MANIFEST"], SCHEDULE["NST_SCHEDULE_OUTPUT"])}
    assert set(specs) == set(deployed)
    for name, spec in specs.items():
        stored = deployed[name]
        assert stored["description"] == spec.description
        assert stored["tags"] == sorted(spec.tags)
        assert stored["parameters"] == spec.parameters
        assert stored["enforce_parameter_schema"] is spec.enforce_parameter_schema
        assert stored["schedules"] == ([(spec.cron, spec.timezone, spec.schedule_active, spec.schedule_parameters)] if spec.cron else [])
        assert (stored["concurrency_limit"], stored["collision_strategy"]) == (spec.concurrency_limit, spec.collision_strategy)
    assert (deployed["scheduled"]["concurrency_limit"], deployed["scheduled"]["collision_strategy"]) == (1, "CANCEL_NEW")
    assert deployed["adhoc"]["concurrency_limit"] is None  # runs by hand may overlap; leases keep items apart


def test_nst_serve_stores_the_same_deployments_as_prefect_deploy(deployed: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    from nst_cli.serve import WORK_POOL

    result = subprocess.run([sys.executable, "-m", "nst_cli.main", "serve", "--work-pool", WORK_POOL], cwd=REPO,
                            env=_cli_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name, before in deployed.items():
        assert _stored(name) == before, name  # same id (updated in place), same options


# ----------------------------------------------------------------------------- one nightly run at a time


def test_a_scheduled_run_due_while_one_runs_is_cancelled_by_the_server(deployed: dict[str, dict[str, Any]]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running

    dep_id = deployed["scheduled"]["id"]
    with get_client(sync_client=True) as client:
        slow = client.create_flow_run_from_deployment(dep_id)
        next_night = client.create_flow_run_from_deployment(dep_id)
        try:
            assert client.set_flow_run_state(slow.id, Pending()).state.is_pending()
            assert client.set_flow_run_state(slow.id, Running()).state.is_running()
            client.set_flow_run_state(next_night.id, Pending())  # what a worker does when the next run is due
            assert client.read_flow_run(next_night.id).state.is_cancelled(), "the next run must not start beside the slow one"
        finally:
            client.set_flow_run_state(slow.id, Completed(), force=True)
        after = client.create_flow_run_from_deployment(dep_id)  # the slot is free again
        assert client.set_flow_run_state(after.id, Pending()).state.is_pending()
        client.set_flow_run_state(after.id, Completed(), force=True)


# ----------------------------------------------------------------------------- server-side alerts


@pytest.fixture(scope="module")
def alerts(deployed: dict[str, dict[str, Any]], webhook: Webhook) -> dict[str, str]:
    """The alerts created as ``nst serve --alerts-only`` does, with a 10 s deadline (Prefect's minimum)."""
    from nst_cli.alerts import ensure_alerts

    return ensure_alerts(webhook.url, scheduled_deployment_id=deployed["scheduled"]["id"], deadline_s=10)


def _for_run(run_id: Any) -> Any:
    return lambda request: str(run_id) in request["body"]


def test_a_failed_run_is_posted_by_the_server_automation(alerts: dict[str, str], webhook: Webhook, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from flows.stylize_manifest import stylize_manifest

    monkeypatch.delenv("NST_FAILURE_WEBHOOK", raising=False)  # not the worker-side hook: the server alone
    missing = tmp_path / f"missing-{uuid.uuid4().hex[:8]}.csv"
    state = stylize_manifest(manifest_uri=str(missing), output_uri=str(tmp_path / "out"), allow_local_paths=True, return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    posts = webhook.wait_for(_for_run(run_id), timeout=120)
    assert posts, "the failure automation did not call the webhook"
    assert posts[0]["headers"].get("Content-Type") == "application/json"
    payload = json.loads(posts[0]["body"])
    assert payload["event"] == "nst.flow_run.failed" and payload["source"] == "prefect-automation"
    assert payload["flow"] == FLOW and payload["deployment"] is None
    assert payload["flow_run"]["id"] == str(run_id) and payload["flow_run"]["state"] == "Failed"
    assert payload["flow_run"]["name"] in payload["text"] and "Failed" in payload["text"]
    assert payload["parameters"]["manifest_uri"] == str(missing)
    assert webhook.url not in posts[0]["body"]


def test_the_webhook_url_lives_only_in_the_block(alerts: dict[str, str], webhook: Webhook) -> None:
    from prefect.client.orchestration import get_client

    from nst_cli.alerts import FAILED_AUTOMATION, OVERDUE_AUTOMATION, WEBHOOK_BLOCK

    with get_client(sync_client=True) as client:
        block = client.read_block_document_by_name(WEBHOOK_BLOCK, block_type_slug="webhook", include_secrets=False)
        automations = [a for name in (FAILED_AUTOMATION, OVERDUE_AUTOMATION) for a in client.read_automations_by_name(name)]
    assert len(automations) == 2, "one of each, replaced by name when created again"
    assert webhook.url not in block.model_dump_json() and "127.0.0.1" not in json.dumps(block.data, default=str)
    for automation in automations:
        assert webhook.url not in automation.model_dump_json()
        assert [str(a.block_document_id) for a in automation.actions] == [alerts[WEBHOOK_BLOCK]]


def test_a_scheduled_run_not_finished_by_its_deadline_is_posted(alerts: dict[str, str], deployed: dict[str, dict[str, Any]], webhook: Webhook) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running

    dep_id = deployed["scheduled"]["id"]
    with get_client(sync_client=True) as client:
        on_time = client.create_flow_run_from_deployment(dep_id)  # first: its bucket closes before the overdue one's
        client.set_flow_run_state(on_time.id, Pending())
        client.set_flow_run_state(on_time.id, Running())
        client.set_flow_run_state(on_time.id, Completed())
        stuck = client.create_flow_run_from_deployment(dep_id)
        client.set_flow_run_state(stuck.id, Pending())  # a worker took it, then went silent (a lost node)
        try:
            posts = webhook.wait_for(_for_run(stuck.id), timeout=120)
        finally:
            client.set_flow_run_state(stuck.id, Completed(), force=True)  # frees the deployment's slot
    assert posts, "the overdue automation did not call the webhook"
    payload = json.loads(posts[0]["body"])
    assert payload["event"] == "nst.flow_run.overdue" and payload["deployment"] == f"{FLOW}/scheduled"
    assert payload["flow_run"]["id"] == str(stuck.id) and payload["deadline_s"] == 10
    assert str(stuck.id) in payload["text"] and "10 s" in payload["text"]
    assert not [r for r in webhook.received if str(on_time.id) in r["body"]], "a run that finished in time was posted"


def test_alerts_refuse_a_webhook_that_is_not_http_and_never_echo_it() -> None:
    from nst_cli.alerts import check_webhook_url

    for bad in ("file:///etc/passwd", "hooks.example.com/T0/secret-token", "https:///no-host"):
        with pytest.raises(ValueError) as info:
            check_webhook_url(bad)
        assert bad not in str(info.value) and "secret-token" not in str(info.value)


# ----------------------------------------------------------------------------- runs that explain themselves


RETRY = {"retries": 2, "retry_delay_s": 0.5}


@pytest.fixture(scope="module")
def explained_run(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real run of the flow (the sample manifest, tiny sizes, one item per batch), and what the
    progress artifact held on the server each time a progress figure was published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
    from prefect.runtime import flow_run

    from flows.progress import listening
    from flows.stylize_manifest import stylize_manifest
    from nst_core.params import StyleParams

    seen: list[tuple[float, Any]] = []

    def on_progress(now: Any) -> None:  # on the flow's thread, right after the flow published
        with get_client(sync_client=True) as client:
            [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.get_id()]), type=ArtifactFilterType(any_=["progress"])))  # fmt: skip
        seen.append((100.0 * now.done / now.total, artifact.data))

    out = tmp_path_factory.mktemp("explained")
    with listening(on_progress):
        state = stylize_manifest(manifest_uri=str(REPO / "manifests" / "samples.csv"), output_uri=str(out), allow_local_paths=True,
                                 defaults=StyleParams(size=32, iterations=3, weights="random:0"), batch_size=1, **RETRY,
                                 return_state=True)  # fmt: skip
    assert state.is_completed(), state.message
    summary = state.result()
    import pandas as pd

    rows = pd.read_csv(summary["results_csv"]).sort_values("row")
    return {"flow_run_id": state.state_details.flow_run_id, "summary": summary, "rows": rows, "progress": seen}


def _task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_task_runs_are_named_by_the_rows_and_ids_they_hold(explained_run: dict[str, Any]) -> None:
    from tasks.naming import rows_label

    rows = explained_run["rows"]
    names = {t.name for t in _task_runs(explained_run["flow_run_id"])}
    run_folder_name = explained_run["summary"]["run_folder"].rstrip("/").rsplit("/", 1)[-1]
    expected = {"read manifest samples.csv", f"resolve {rows_label(rows['row'])}", f"report {run_folder_name}"}
    expected |= {f"stylize row {r.row}: {r.id}" for r in rows.itertuples()}  # batch_size=1: one item per task run
    assert expected <= names, sorted(names)
    assert rows_label([120, 121, 122]) == "rows 120-122" and rows_label([3, 7, 9, 11, 13]) == "rows 3, 7, 9, 11, ... (5)"


def test_the_report_is_a_task_and_retries_use_prefects_backoff_with_jitter(explained_run: dict[str, Any]) -> None:
    from flows.stylize_manifest import RETRY_JITTER_FACTOR

    runs = _task_runs(explained_run["flow_run_id"])
    [report] = [t for t in runs if t.name.startswith("report ")]
    assert report.state.is_completed() and explained_run["summary"]["report"].endswith("/report.html")
    retried = [t for t in runs if t.name.startswith(("stylize ", "resolve "))]
    assert len(retried) == len(explained_run["rows"]) + 1
    for t in retried:  # what the server stores as each task run's retry policy
        policy = t.empirical_policy
        assert policy.retries == RETRY["retries"], t.name
        assert policy.retry_delay == [RETRY["retry_delay_s"] * 2**i for i in range(RETRY["retries"])], t.name
        assert policy.retry_jitter_factor == RETRY_JITTER_FACTOR == 0.5, t.name


def test_the_progress_artifact_is_updated_as_each_batch_finishes(explained_run: dict[str, Any]) -> None:
    seen = explained_run["progress"]
    assert len(seen) == len(explained_run["rows"]) + 1  # once after resolving the chunk, once per batch (one item each)
    for expected, on_server in seen:
        assert on_server == pytest.approx(expected), seen
    assert seen[-1][0] == 100.0


def test_each_run_emits_started_and_finished_events_with_its_counts(explained_run: dict[str, Any]) -> None:
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    from flows.events import FINISHED, STARTED

    flow_run = f"prefect.flow-run.{explained_run['flow_run_id']}"
    deadline = time.monotonic() + 60  # the server persists events in the background: wait until both are there
    with get_client(sync_client=True) as client:
        while True:
            wanted = EventFilter(event=EventNameFilter(prefix=["nst.run."]), related=EventRelatedFilter(id=[flow_run]))
            found = {e.event: e for e in client.read_events(filter=wanted, limit=50).events}  # the server's maximum
            if {STARTED, FINISHED} <= set(found) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert {STARTED, FINISHED} <= set(found), sorted(found)
    rows, summary = explained_run["rows"], explained_run["summary"]
    started, finished = found[STARTED], found[FINISHED]
    assert started.resource.id == finished.resource.id == f"nst.run.{explained_run['flow_run_id']}"
    assert started.payload["rows"] == len(rows) and started.payload["invalid"] == 0
    assert finished.payload["counts"] == summary["counts"] and sum(finished.payload["counts"].values()) == len(rows)
    assert finished.resource["nst.outcome"] == "succeeded" and finished.resource["nst.failed"] == "0"
    assert any(r.id.startswith("prefect.flow.") for r in finished.related)  # what automations match on


def test_nst_serve_creates_the_alerts_before_it_serves(alerts: dict[str, str], webhook: Webhook, tmp_path: Path) -> None:
    """Serve mode (no work pool): the deployments are registered, then the alerts, then it serves."""
    from prefect.client.orchestration import get_client

    from nst_cli.alerts import FAILED_AUTOMATION

    with get_client(sync_client=True) as client:
        [before] = client.read_automations_by_name(FAILED_AUTOMATION)
    proc = subprocess.Popen([sys.executable, "-m", "nst_cli.main", "serve", "--no-schedule"], cwd=REPO,
                            env=_cli_env(tmp_path, NST_FAILURE_WEBHOOK=webhook.url), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process does; it prints "serving ..." once the alerts exist
            lines.append(line)
            if line.startswith("serving "):
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    output = "".join(lines)
    assert any(line.startswith("serving ") for line in lines), output
    assert f"automation {FAILED_AUTOMATION!r}" in output and webhook.url not in output
    with get_client(sync_client=True) as client:
        [after] = client.read_automations_by_name(FAILED_AUTOMATION)
    assert after.id != before.id  # created again by this `nst serve`, replacing the one of the same name


def test_the_worker_hook_leaves_deployment_runs_to_the_server_by_default(webhook: Webhook, monkeypatch: pytest.MonkeyPatch) -> None:
    """notify_failure still posts runs no automation watches (nst run's), and deployment runs only when asked."""
    from types import SimpleNamespace

    from flows.hooks import notify_failure

    flow, state = SimpleNamespace(name=FLOW), SimpleNamespace(name="Failed", message="x")
    monkeypatch.setenv("NST_FAILURE_WEBHOOK", webhook.url)
    monkeypatch.delenv("NST_FAILURE_WEBHOOK_SCOPE", raising=False)
    tag = uuid.uuid4().hex[:8]
    by_deployment = SimpleNamespace(id=f"dep-{tag}", name="n", auto_scheduled=True, deployment_id=uuid.uuid4(), parameters={})
    in_process = SimpleNamespace(id=f"local-{tag}", name="n", auto_scheduled=False, deployment_id=None, parameters={})
    notify_failure(flow, by_deployment, state)
    notify_failure(flow, in_process, state)
    assert webhook.wait_for(lambda r: f"local-{tag}" in r["body"], timeout=30)  # posted synchronously; the wait is a bound
    assert not [r for r in webhook.received if f"dep-{tag}" in r["body"]], "the server's automation posts deployment runs"
    monkeypatch.setenv("NST_FAILURE_WEBHOOK_SCOPE", "all")
    notify_failure(flow, by_deployment, state)
    assert webhook.wait_for(lambda r: f"dep-{tag}" in r["body"], timeout=30)


def test_a_gpu_limit_is_held_around_each_optimisation_only(prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a global concurrency limit named like ``NST_GPU_LIMIT`` on the server, each optimisation holds
    one slot, acquired after the task's lease and fetches and released before its uploads end (old code:
    a ``gpu`` *tag* limit held for the whole task run, lease waits included)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    import flows.stylize_manifest as module
    from nst_core.params import StyleParams

    name = f"nst-test-gpu-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        limit_id = client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    monkeypatch.setattr(module, "DEVICE_LIMIT", name)
    state = module.stylize_manifest(manifest_uri=str(REPO / "manifests" / "samples.csv"), output_uri=str(tmp_path / "out"),
                                    allow_local_paths=True, defaults=StyleParams(size=32, iterations=3, weights="random:0"),
                                    batch_size=1, return_state=True, **RETRY)  # fmt: skip
    assert state.is_completed(), state.message
    rows = len(state.result()["counts"]) and sum(state.result()["counts"].values())
    wanted = EventFilter(event=EventNameFilter(prefix=["prefect.concurrency-limit."]),
                         resource=EventResourceFilter(id=[f"prefect.concurrency-limit.{limit_id}"]))  # fmt: skip
    deadline = time.monotonic() + 60  # the server persists events in the background
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=wanted, limit=50).events
            if sum(e.event.endswith(".released") for e in events) >= rows or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        tasks = [t for t in _task_runs(state.state_details.flow_run_id) if t.name.startswith("stylize ")]
    acquired = sorted(e.occurred for e in events if e.event.endswith(".acquired"))
    released = sorted(e.occurred for e in events if e.event.endswith(".released"))
    assert len(acquired) == len(released) == rows == len(tasks)  # one slot per optimisation (one item each)
    assert all("gpu" not in t.tags for t in tasks)  # no tag limit holds the whole task
    held = sum((r - a).total_seconds() for a, r in zip(acquired, released, strict=True))  # limit 1: the holds do not overlap
    ran = sum((t.end_time - t.start_time).total_seconds() for t in tasks)
    assert 0 < held < ran
    assert min(acquired) > min(t.start_time for t in tasks) and max(released) < max(t.end_time for t in tasks)
