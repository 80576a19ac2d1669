"""The local stack as a person uses it: `make up`, the Prefect UI's custom-run form, the REST API.

One private stack for the module (``python -m infra.stack up --dir <tmp> --free-ports``: its own
folder and ports, so it never meets a developer's ``.stack`` or this session's servers), stopped
by ``down`` at the end. The browser test drives Debian's Chromium through Playwright (never
``playwright install``) and leaves screenshots in ``test-output/`` at the repo root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import Webhook

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "test-output"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLOW = "stylize_manifest"
TINY = {"size": 32, "iterations": 3, "weights": "random:0"}

slow = pytest.mark.slow  # the tests that start the stack; `make test` runs them


# ----------------------------------------------------------------------------- helpers


@dataclass
class StackHandle:
    root: Path
    state: dict[str, Any]
    secrets: dict[str, str]
    up_output: str
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def ui(self) -> str:
        return self.state["ui_url"]

    def api(self, method: str, path: str, body: Any = None, auth: str | None = "stack", timeout: float = 30) -> tuple[int, Any]:
        """A REST call to the stack's Prefect server: with its auth string ("stack"), another string, or none (None)."""
        from infra.stack import api

        secret = None if auth is None else {"PREFECT_API_AUTH_STRING": self.secrets["PREFECT_API_AUTH_STRING"] if auth == "stack" else auth}
        return api(self.state, secret, method, path, body, timeout)

    def deployment(self, name: str) -> dict[str, Any]:
        status, body = self.api("GET", f"/deployments/name/{FLOW}/{name}")
        assert status == 200, body
        return body

    def s3(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.state["s3_endpoint"],
            aws_access_key_id=self.secrets["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.secrets["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def wait_flow_run(self, run_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, run = self.api("GET", f"/flow_runs/{run_id}")
            if status == 200 and run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        pytest.fail(f"flow run {run_id} not finished after {timeout:.0f} s (last state {run.get('state_type')}); "
                    f"worker log:\n{_tail(self.root / 'logs' / 'worker.log')}")  # fmt: skip


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stack_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(extra)
    return env


def _run_stack(command: str, root: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.stack", command, "--dir", str(root), "--free-ports"] if command == "up"
                          else [sys.executable, "-m", "infra.stack", command, "--dir", str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _read_pids(root: Path) -> dict[str, int]:
    out = {}
    for path in (root / "pids").glob("*.pid"):
        out[path.stem] = int(json.loads(path.read_text())["pid"])
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _group_members(pgids: set[int]) -> set[int]:
    members = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids and fields[0] != "Z":
            members.add(int(proc.name))
    return members


def _listening_sockets(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, port) of every TCP socket in LISTEN state held by ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:
                continue
            addr_hex, port_hex = local.split(":")
            if len(addr_hex) == 8:
                addr = ".".join(str(int(addr_hex[i : i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                addr = "ipv6:" + addr_hex
            found.append((addr, int(port_hex, 16)))
    return found


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Iterator[StackHandle]:
    root = Path(tempfile.mkdtemp(prefix="nst-stack-"))  # short path; the pytest tmp tree is long
    env = _stack_env({"NST_FAILURE_WEBHOOK": webhook.url})
    t0 = time.monotonic()
    result = _run_stack("up", root, env, timeout=600)
    if result.returncode != 0:
        _run_stack("down", root, env, timeout=120)
        pytest.fail(f"`up` failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"stack up in {time.monotonic() - t0:.0f} s")
    secrets: dict[str, str] = {}
    for line in (root / "secrets.env").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            secrets[key] = value.strip("'")
    handle = StackHandle(root, json.loads((root / "stack.json").read_text()), secrets, result.stdout + result.stderr, _read_pids(root))
    try:
        yield handle
    finally:
        result = _run_stack("down", root, env, timeout=180)
        still = [pid for pid in _group_members(set(handle.pids.values())) if _alive(pid)]
        shutil.rmtree(root, ignore_errors=True)
        assert result.returncode == 0, result.stderr
        assert not still, f"`down` left processes running: {still}"


# ----------------------------------------------------------------------------- tests


@slow
def test_up_prints_what_to_use_and_no_secret(stack: StackHandle) -> None:
    out = stack.up_output
    assert re.search(r"http://127\.0\.0\.1:\d+\b", out), out
    assert stack.ui in out and "s3://nst" in out
    assert f"{FLOW}/adhoc" in out and f"{FLOW}/scheduled" in out
    assert "prefect deployment run 'stylize_manifest/adhoc'" in out
    for name, value in stack.secrets.items():
        assert value and value not in out, f"`up` printed {name}"
        if name == "PREFECT_API_AUTH_STRING":
            assert value.split(":", 1)[1] not in out
    for name in ("secrets.env", "env", "stack.json"):
        assert (stack.root / name).stat().st_mode & 0o777 == 0o600, name
    assert (stack.root).stat().st_mode & 0o777 == 0o700


@slow
def test_every_stack_port_is_on_loopback_only(stack: StackHandle) -> None:
    members = _group_members(set(stack.pids.values()))
    sockets = _listening_sockets(members)
    ports = {port for _, port in sockets}
    assert int(stack.ui.rsplit(":", 1)[1]) in ports and int(stack.state["s3_endpoint"].rsplit(":", 1)[1]) in ports, sockets
    assert all(addr == "127.0.0.1" for addr, _ in sockets), sockets


@slow
def test_api_refuses_requests_without_the_auth_string(stack: StackHandle) -> None:
    status, body = stack.api("POST", "/deployments/filter", {}, auth=None)
    assert status == 401, body
    status, _ = stack.api("POST", "/deployments/filter", {}, auth="nst:not-the-secret")
    assert status == 401
    status, body = stack.api("POST", "/deployments/filter", {})
    assert status == 200 and {d["name"] for d in body} >= {"adhoc", "scheduled"}
    status, _ = stack.api("GET", "/health", auth=None)  # Prefect leaves health probes open, by design
    assert status == 200


@slow
def test_scheduled_deployment_has_its_cron_and_parameters(stack: StackHandle) -> None:
    dep = stack.deployment("scheduled")
    assert dep["work_pool_name"] == "nst-local"
    assert dep["enforce_parameter_schema"] is True
    assert dep["parameters"]["allow_local_paths"] is False
    [schedule] = dep["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"] is True
    assert schedule["parameters"] == {"manifest_uri": "s3://nst/manifests/samples.csv", "output_uri": "s3://nst/outputs/scheduled"}
    adhoc = stack.deployment("adhoc")
    assert adhoc["parameters"] == {"allow_local_paths": False} and not adhoc["schedules"]
    assert adhoc["enforce_parameter_schema"] is True

    # The scheduler really creates the next runs, with the schedule's parameters.
    deadline = time.monotonic() + 120
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not runs:
        status, runs = stack.api("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}},
                                                               "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})  # fmt: skip
        assert status == 200, runs
        if not runs:
            time.sleep(2)
    assert runs, f"no scheduled runs; server log:\n{_tail(stack.root / 'logs' / 'prefect-server.log')}"
    assert all(r["parameters"]["manifest_uri"] == "s3://nst/manifests/samples.csv" for r in runs)
    for r in runs:
        start = datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00")).astimezone(UTC)
        assert (start.hour, start.minute) == (2, 0), r["expected_start_time"]


@slow
def test_nst_serve_and_prefect_yaml_declare_the_same_deployments(stack: StackHandle) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nst_cli.main", "serve", "--dry-run",
         "--schedule-manifest", "s3://nst/manifests/samples.csv", "--schedule-output", "s3://nst/outputs/scheduled"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=_stack_env({"PREFECT_HOME": str(stack.root / "cli-home")}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    specs = {s["name"]: s for s in json.loads(result.stdout)}
    assert set(specs) == {"adhoc", "scheduled"}
    for name, spec in specs.items():
        dep = stack.deployment(name)
        assert dep["description"] == spec["description"]
        assert sorted(dep["tags"]) == sorted(spec["tags"])
        assert dep["parameters"] == spec["parameters"]
        assert dep["enforce_parameter_schema"] == spec["enforce_parameter_schema"]
        if spec["cron"]:
            [schedule] = dep["schedules"]
            assert schedule["schedule"]["cron"] == spec["cron"] and schedule["schedule"]["timezone"] == spec["timezone"]
            assert schedule["parameters"] == spec["schedule_parameters"]
            assert schedule["active"] == spec["schedule_active"]
    yaml_doc = yaml.safe_load((REPO / "prefect.yaml").read_text())  # what `make up` applied (generated from nst_cli/serve.py)
    assert {d["name"] for d in yaml_doc["deployments"]} == set(specs)
    scheduled = stack.deployment("scheduled")
    assert scheduled["global_concurrency_limit"]["limit"] == specs["scheduled"]["concurrency_limit"] == 1
    assert scheduled["concurrency_options"]["collision_strategy"] == specs["scheduled"]["collision_strategy"] == "CANCEL_NEW"


@slow
def test_run_form_schema_describes_every_parameter_and_server_refuses_bad_ones(stack: StackHandle) -> None:
    dep = stack.deployment("adhoc")
    schema = dep["parameter_openapi_schema"]
    props = schema["properties"]
    style = schema["definitions"]["StyleParams"]["properties"]
    for name, prop in [*props.items(), *style.items()]:
        assert prop.get("description"), f"{name} has no description"
        assert name in schema.get("required", []) or "default" in prop or name in style, f"{name} has no default"
    assert set(schema["required"]) == {"manifest_uri", "output_uri"}
    assert style["optimizer"]["enum"] == ["lbfgs", "adam"] and style["output_format"]["enum"]
    assert "relu4_2" in style["content_layers"]["items"]["enum"]
    assert "Allowed: 16 to 8192" in style["size"]["description"]
    assert "Allowed: 1 to 10000" in props["chunk_size"]["description"]

    good = {"manifest_uri": "s3://nst/manifests/samples.csv", "output_uri": "s3://nst/outputs/never"}
    for params, field_name in (
        ({**good, "defaults": {"size": 8}}, "defaults.size"),
        ({**good, "defaults": {"optimizer": "sgd"}}, "defaults.optimizer"),
        ({**good, "defaults": {"style_layers": ["relu9_9"]}}, "defaults.style_layers[0]"),
        ({**good, "chunk_size": 0}, "chunk_size"),
        ({"output_uri": "s3://nst/outputs/never"}, "manifest_uri"),
    ):
        status, body = stack.api("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
        assert status == 409, (params, status, body)
        assert field_name in str(body), body
    status, runs = stack.api("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
    assert status == 200 and runs == [], "a refused run must not exist"


@slow
def test_failed_scheduled_deployment_run_is_posted_by_the_servers_automation(stack: StackHandle, webhook: Webhook) -> None:
    dep = stack.deployment("scheduled")
    missing = f"s3://nst/manifests/missing-{uuid.uuid4().hex[:8]}.csv"
    status, run = stack.api("POST", f"/deployments/{dep['id']}/create_flow_run",
                            {"parameters": {"manifest_uri": missing, "defaults": TINY}})  # fmt: skip
    assert status == 201, run
    done = stack.wait_flow_run(run["id"], timeout=240)
    assert done["state_type"] == "FAILED", done["state"]
    posts = webhook.wait_for(lambda r: run["id"] in r["body"], timeout=120)  # the server's automation (make up created it)
    assert posts, f"no webhook call; server log:\n{_tail(stack.root / 'logs' / 'prefect-server.log')}"
    payload = json.loads(posts[0]["body"])
    assert posts[0]["headers"].get("Content-Type") == "application/json"
    assert payload["flow_run"]["id"] == run["id"] and payload["flow_run"]["state"] == "Failed"
    assert payload["source"] == "prefect-automation" and payload["deployment"] == f"{FLOW}/scheduled"
    assert payload["parameters"]["manifest_uri"] == missing
    assert payload["flow_run"]["url"] == f"{stack.ui}/runs/flow-run/{run['id']}"
    assert run["name"] in payload["text"]
    for name, value in stack.secrets.items():
        assert value not in posts[0]["body"], f"the webhook payload holds {name}"
    assert webhook.url not in posts[0]["body"]


def _run_with_output(stack: StackHandle, prefix: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, runs = stack.api("POST", "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 20})
        for run in runs if status == 200 else []:
            if run["parameters"].get("output_uri") == f"s3://nst/{prefix}":
                return run["id"]
        time.sleep(1)
    pytest.fail(f"the UI's run (output s3://nst/{prefix}) was not created")


@slow
def test_browser_custom_run_from_the_ui(stack: StackHandle) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect, sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium (make install does)")
    OUT.mkdir(exist_ok=True)
    form_png, run_png = OUT / "stack-custom-run-form.png", OUT / "stack-finished-run.png"
    prefix = f"outputs/ui-{uuid.uuid4().hex[:8]}"
    profile = tempfile.mkdtemp(prefix="nst-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                                        viewport={"width": 1400, "height": 1000})  # fmt: skip
            ctx.set_default_timeout(60_000)
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            try:
                page.goto(stack.ui + "/")
                page.get_by_placeholder("admin:pass").fill(stack.secrets["PREFECT_API_AUTH_STRING"])
                page.get_by_role("button", name="Login").click()
                page.wait_for_url(lambda url: "/login" not in url)

                page.get_by_role("link", name="Deployments", exact=True).first.click()
                page.get_by_role("link", name="adhoc", exact=True).first.click()
                page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]+"))
                page.get_by_role("button", name="Run", exact=True).click()
                page.get_by_role("menuitem", name="Custom run").click()
                page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]+/run"))

                page.get_by_label("manifest_uri", exact=True).fill("s3://nst/manifests/samples.csv")
                page.get_by_label("output_uri", exact=True).fill(f"s3://nst/{prefix}")
                page.get_by_label("Size (Optional)", exact=True).fill(str(TINY["size"]))
                page.get_by_label("Iterations (Optional)", exact=True).fill(str(TINY["iterations"]))
                page.get_by_label("Weights (Optional)", exact=True).fill(TINY["weights"])
                # What a person sees: descriptions with bounds, enums as dropdowns, layers as a multi-select.
                expect(page.get_by_text("The manifest CSV: s3://bucket/key", exact=False)).to_be_visible()
                expect(page.get_by_text("Allowed: 16 to 8192", exact=False)).to_be_visible()
                page.set_viewport_size({"width": 1400, "height": 2000})
                page.screenshot(path=str(form_png))
                page.set_viewport_size({"width": 1400, "height": 1000})

                page.get_by_role("button", name="Submit").click()
                try:
                    page.get_by_text("View run", exact=True).click(timeout=30_000)  # the toast that confirms the run
                    page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]+"))
                except PlaywrightTimeoutError:  # toast missed (a slow machine): find the run, open its page
                    page.goto(f"{stack.ui}/v2/runs/flow-run/{_run_with_output(stack, prefix)}")
                run_id = re.search(r"/runs/flow-run/([0-9a-f-]+)", page.url).group(1)  # type: ignore[union-attr]
                assert stack.api("GET", f"/flow_runs/{run_id}")[1]["parameters"]["output_uri"] == f"s3://nst/{prefix}"

                done = stack.wait_flow_run(run_id, timeout=300)
                assert done["state_type"] == "COMPLETED", done["state"]
                assert done["parameters"]["defaults"]["size"] == TINY["size"]
                expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=60_000)
                page.screenshot(path=str(run_png))
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)

    s3 = stack.s3()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="nst", Prefix=prefix + "/").get("Contents", [])]
    metas = [k for k in keys if k.endswith("/meta.json")]
    assert len(metas) == 4, keys  # 2 contents x 2 styles
    assert len([k for k in keys if re.search(r"/items/[^/]+/stylized\.png$", k)]) == 4
    assert any(k.endswith("/results.csv") for k in keys)
    meta = json.loads(s3.get_object(Bucket="nst", Key=metas[0])["Body"].read())
    assert "random:0" in json.dumps(meta)
    assert form_png.stat().st_size > 10_000 and run_png.stat().st_size > 10_000


@slow
def test_down_and_up_keep_the_data(stack: StackHandle) -> None:
    env = _stack_env({})
    before = {name: stack.deployment(name)["id"] for name in ("adhoc", "scheduled")}
    status, runs_before = stack.api("POST", "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED"]}}}})
    assert status == 200
    pids = _read_pids(stack.root)
    result = _run_stack("down", stack.root, env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert not [p for p in _group_members(set(pids.values()))], "processes left after down"
    assert not list((stack.root / "pids").glob("*.pid"))

    result = _run_stack("up", stack.root, env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stack.pids = _read_pids(stack.root)
    assert {name: stack.deployment(name)["id"] for name in ("adhoc", "scheduled")} == before
    status, runs_after = stack.api("POST", "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED"]}}}})
    assert {r["id"] for r in runs_after} >= {r["id"] for r in runs_before}
    keys = [o["Key"] for o in stack.s3().list_objects_v2(Bucket="nst", Prefix="outputs/").get("Contents", [])]
    assert any(k.endswith("/meta.json") for k in keys)



# ----------------------------------------------------------------------------- fast checks (no stack)


def test_failure_payload_names_the_run_and_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from flows.hooks import build_payload

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-aws-value-123")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "nst:hunter2-password")
    monkeypatch.setenv("NST_FAILURE_WEBHOOK", "https://hooks.example.com/T000/B000/tokentoken")
    monkeypatch.setenv("PREFECT_UI_URL", "http://127.0.0.1:4200")
    run = SimpleNamespace(id="1234", name="amber-fox", auto_scheduled=True,
                          parameters={"manifest_uri": "s3://b/m.csv?X-Amz-Signature=abc", "output_uri": "s3://b/out", "defaults": {}})
    state = SimpleNamespace(name="Failed", message="boom with s3cr3t-aws-value-123 and hunter2-password at https://u:p@h/x?sig=1")
    payload = build_payload(SimpleNamespace(name="stylize_manifest"), run, state)
    text = json.dumps(payload)
    for secret in ("s3cr3t-aws-value-123", "hunter2-password", "tokentoken", "X-Amz-Signature", "sig=1", "u:p@"):
        assert secret not in text
    assert payload["flow_run"] == {"id": "1234", "name": "amber-fox", "state": "Failed", "message": payload["flow_run"]["message"],
                                   "scheduled": True, "url": "http://127.0.0.1:4200/runs/flow-run/1234"}  # fmt: skip
    assert payload["parameters"] == {"manifest_uri": "s3://b/m.csv", "output_uri": "s3://b/out"}
    assert "amber-fox" in payload["text"] and "Failed" in payload["text"] and "scheduled" in payload["text"]


def test_notify_failure_posts_once_and_respects_its_scope(monkeypatch: pytest.MonkeyPatch, webhook: Webhook) -> None:
    from types import SimpleNamespace

    from flows.hooks import notify_failure

    flow = SimpleNamespace(name="stylize_manifest")
    state = SimpleNamespace(name="Failed", message="x")
    monkeypatch.setenv("NST_FAILURE_WEBHOOK", webhook.url)
    monkeypatch.setenv("NST_FAILURE_WEBHOOK_SCOPE", "scheduled")
    notify_failure(flow, SimpleNamespace(id="by-hand", name="n", auto_scheduled=False, parameters={}), state)
    notify_failure(flow, SimpleNamespace(id="by-cron", name="n", auto_scheduled=True, parameters={}), state)
    bodies = [r["body"] for r in webhook.received]
    assert any("by-cron" in b for b in bodies) and not any("by-hand" in b for b in bodies)
    monkeypatch.setenv("NST_FAILURE_WEBHOOK", "http://127.0.0.1:9/unreachable")
    notify_failure(flow, SimpleNamespace(id="r", name="n", auto_scheduled=True, parameters={}), state)  # logs, never raises
    monkeypatch.delenv("NST_FAILURE_WEBHOOK")
    notify_failure(flow, SimpleNamespace(id="r", name="n", auto_scheduled=True, parameters={}), state)  # unset: nothing


def test_flow_parameter_schema_has_descriptions_bounds_and_enums() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.stylize_manifest import stylize_manifest

    schema = parameter_schema(stylize_manifest).model_dump()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
    assert "Allowed: 1 to 10000" in schema["properties"]["chunk_size"]["description"]
    assert "Allowed: >= 1, or blank" in schema["properties"]["max_items"]["description"]
    style = schema["definitions"]["StyleParams"]["properties"]
    assert all(p.get("description") for p in style.values())
    assert style["pooling"]["enum"] == ["avg", "max"]
    assert "pool5" in style["style_layers"]["items"]["enum"]


def test_s3_manifest_points_sample_paths_at_the_bucket(tmp_path: Path) -> None:
    from infra.stack import s3_manifest

    images = tmp_path / "nst_samples"  # the repository's layout: manifests/ beside the samples package
    images.mkdir(parents=True)
    text = ("id,content_uri,style_uri,init,meta_x\n"
            "a,../nst_samples/c.jpg,../nst_samples/s.jpg,noise,keep\n"
            "b,s3://other/c.jpg,http://example.com/s.jpg,../nst_samples/i.png,x\n")  # fmt: skip
    out = s3_manifest(text, tmp_path / "manifests", images, "nst")
    assert out.splitlines() == [
        "id,content_uri,style_uri,init,meta_x",
        "a,s3://nst/images/c.jpg,s3://nst/images/s.jpg,noise,keep",
        "b,s3://other/c.jpg,http://example.com/s.jpg,s3://nst/images/i.png,x",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--dry-run"], "--schedule-manifest and --schedule-output"),
        (["serve", "--dry-run", "--schedule-manifest", "/data/m.csv", "--schedule-output", "s3://b/o"], "s3:// URIs only"),
        (["serve", "--dry-run", "--schedule-manifest", "s3://b/m.csv", "--schedule-output", "s3://b/o", "--cron", "61 * * *"], "Invalid cron"),
    ],
)
def test_nst_serve_refuses_unusable_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from nst_cli.main import main

    for name in ("NST_SCHEDULE_MANIFEST", "NST_SCHEDULE_OUTPUT", "NST_SCHEDULE_CRON"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fleet_recipes_are_well_formed() -> None:
    infra = REPO / "infra"
    compose = yaml.safe_load((infra / "compose.yaml").read_text())
    services = compose["services"]
    workers = {name: svc for name, svc in services.items() if name.startswith("gpu-worker-")}
    assert len(workers) >= 2
    assert all(svc["runtime"] == "nvidia" for svc in workers.values())
    assert len({svc["environment"]["NVIDIA_VISIBLE_DEVICES"] for svc in workers.values()}) == len(workers)  # one GPU each
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert all(p.startswith("127.0.0.1:") for svc in services.values() for p in svc.get("ports", []))
    assert "gcl create gpu --limit" in services["prefect-init"]["command"][0]  # the limit each optimisation holds
    assert "nst serve --alerts-only" in services["prefect-init"]["command"][0]  # the server-side alerts
    assert all("NST_FAILURE_WEBHOOK" not in svc["environment"] for svc in workers.values())  # the URL stays in the block

    template = json.loads((infra / "k8s" / "base-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] == 1

    for name in ("nst-worker-policy.json", "minio-nst-worker-policy.json"):
        actions = [a for st in json.loads((infra / "iam" / name).read_text())["Statement"] for a in st["Action"]]
        assert not any(a.endswith("*") or "Delete" in a for a in actions), actions
    sse = json.loads((infra / "s3" / "bucket-encryption.json").read_text())
    assert sse["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert (infra / "docker" / "gpu-worker.Dockerfile").read_text().count("prefect worker start") == 1
