"""The local stack: ``make up`` / ``make down`` / ``make status`` (``python -m infra.stack up|down|status``).

``up`` starts, on 127.0.0.1 only, with everything under one folder (``.stack/``
by default, git-ignored):

* a SeaweedFS S3 server with generated credentials (``infra/seaweedfs.py``,
  data in ``.stack/s3``), a bucket ``nst`` holding the sample images
  (``images/``) and the repo's manifests rewritten to ``s3://`` URIs
  (``manifests/``);
* a Prefect server (SQLite in ``.stack/prefect/prefect.db``) with API auth on:
  ``PREFECT_SERVER_API_AUTH_STRING`` is a generated ``user:password`` kept in
  ``.stack/secrets.env`` (mode 0600, never printed);
* a ``process`` work pool ``nst-local`` with one worker, and the deployments of
  the repository's ``prefect.yaml`` (``prefect deploy --all``): ``stylize_manifest/adhoc``
  and ``stylize_manifest/scheduled``;
* with ``NST_FAILURE_WEBHOOK`` set, the server-side alerts (``nst serve --alerts-only``,
  ``nst_cli/alerts.py``): a Webhook block holding the URL and the automations that
  post failed/crashed runs and overdue scheduled runs (``NST_RUN_DEADLINE_HOURS``);

then prints the UI's address, the bucket, the deployments and the one command
that starts a run. ``.stack/env`` (0600) exports everything a shell needs
(``. .stack/env``: ``PREFECT_API_URL``, the auth string, the AWS_* variables,
the venv on PATH).

``down`` stops every process ``up`` started, by the pid it recorded (and that
pid's process group, which holds the children: uvicorn, flow-run processes),
after checking the pid is still the process it started. Data stays: a later
``up`` reuses the ports, credentials, database and objects.

``--dir`` and ``--free-ports`` let tests run a private stack beside a
developer's. The webhook URL goes to the server's block only, never to the
worker (whose ``notify_failure`` hook would post deployment runs a second time).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import io
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python infra/stack.py` as well as `python -m infra.stack`
    sys.path.insert(0, str(REPO))

import nst_samples  # noqa: E402
from infra.seaweedfs import HOST, PORT_NAMES, REGION, S3Server, find_weed, free_ports, start_s3_server  # noqa: E402

DEFAULT_DIR = REPO / ".stack"
SAMPLE_IMAGES = nst_samples.folder()
PREFECT_YAML = REPO / "prefect.yaml"  # generated from nst_cli/serve.py (nst serve --prefect-yaml)
BUCKET = "nst"
POOL = "nst-local"
WORKER_NAME = "nst-local-worker-1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_S3_PORT = 8333
FLOW = "stylize_manifest"
SCHEDULE_MANIFEST = f"s3://{BUCKET}/manifests/samples.csv"
SCHEDULE_OUTPUT = f"s3://{BUCKET}/outputs/scheduled"
PATH_COLUMNS = ("content_uri", "style_uri", "init", "weights")
SERVER_START_TIMEOUT = float(os.environ.get("NST_STACK_SERVER_TIMEOUT", "420"))
# Processes, in start order; `down` stops them in reverse. marker: a word their command line must hold.
PROCESSES = {"s3": "weed", "prefect-server": "server", "worker": "worker"}


class StackError(RuntimeError):
    """Something the stack could not do; one line for the user."""


# ----------------------------------------------------------------------------- files


@dataclass
class Stack:
    root: Path

    @property
    def state_path(self) -> Path:
        return self.root / "stack.json"

    @property
    def secrets_path(self) -> Path:
        return self.root / "secrets.env"

    @property
    def env_path(self) -> Path:
        return self.root / "env"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def s3_dir(self) -> Path:
        return self.root / "s3"

    def ensure_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for sub in (self.logs, self.pids, self.prefect_home, self.s3_dir):
            sub.mkdir(exist_ok=True)

    # state (not secret): ports, names
    def load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self, state: dict[str, Any]) -> None:
        _write_private(self.state_path, json.dumps(state, indent=2) + "\n")

    # secrets: generated once, 0600, never printed
    def load_secrets(self) -> dict[str, str]:
        values: dict[str, str] = {}
        try:
            text = self.secrets_path.read_text()
        except OSError:
            return values
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("export "):
                line = line[len("export ") :]
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key] = shlex.split(value)[0] if value else ""
        return values

    def ensure_secrets(self) -> dict[str, str]:
        values = self.load_secrets()
        wanted = {
            "PREFECT_API_AUTH_STRING": lambda: "nst:" + secrets.token_urlsafe(24),
            "AWS_ACCESS_KEY_ID": lambda: "NSTSTACK" + secrets.token_hex(6).upper(),
            "AWS_SECRET_ACCESS_KEY": lambda: secrets.token_urlsafe(30),
        }
        changed = False
        for key, make in wanted.items():
            if not values.get(key):
                values[key] = make()
                changed = True
        if changed or (self.secrets_path.stat().st_mode & 0o077):
            lines = ["# nst local stack secrets: generated by `make up`, never printed. Keep private (mode 0600)."]
            lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
            _write_private(self.secrets_path, "\n".join(lines) + "\n")
        return values

    # pids
    def pid_path(self, name: str) -> Path:
        return self.pids / f"{name}.pid"

    def record_pid(self, name: str, pid: int) -> None:
        _write_private(self.pid_path(name), json.dumps({"pid": pid, "started": time.time()}) + "\n")

    def read_pid(self, name: str) -> int | None:
        try:
            return int(json.loads(self.pid_path(name).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def running_pid(self, name: str) -> int | None:
        pid = self.read_pid(name)
        if pid is not None and _is_ours(pid, PROCESSES[name]):
            return pid
        return None


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp-" + secrets.token_hex(4))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _is_ours(pid: int, marker: str, *, starting: bool = False) -> bool:
    """Is ``pid`` alive and still the process we started (not a recycled pid)?

    ``starting``: a process we have just spawned shows an empty command line
    while its interpreter loads; count that as alive.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is not running
        return False
    return marker in cmdline or (starting and not cmdline.strip())


# ----------------------------------------------------------------------------- helpers


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT leftovers are no obstacle
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _choose_ports(state: dict[str, Any], free_only: bool) -> dict[str, Any]:
    if state.get("ports"):
        return state["ports"]
    picks = free_ports(len(PORT_NAMES) + 1)
    prefect_port = picks.pop()
    s3_ports = dict(zip(PORT_NAMES, picks, strict=True))
    if not free_only:
        if _port_free(DEFAULT_PREFECT_PORT):
            prefect_port = DEFAULT_PREFECT_PORT
        if _port_free(DEFAULT_S3_PORT) and DEFAULT_S3_PORT not in s3_ports.values():
            s3_ports["s3"] = DEFAULT_S3_PORT
    return {"prefect": prefect_port, "s3": s3_ports}


def _base_env() -> dict[str, str]:
    """This environment without Prefect/AWS settings (ours are set explicitly), quiet and offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "WEED_"))}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


def _api_url(state: dict[str, Any]) -> str:
    return f"http://{HOST}:{state['ports']['prefect']}/api"


def _ui_url(state: dict[str, Any]) -> str:
    return f"http://{HOST}:{state['ports']['prefect']}"


def client_env(stack: Stack, state: dict[str, Any], secret: dict[str, str]) -> dict[str, str]:
    """What a Prefect client (CLI, worker, flow run) needs to reach this stack and its S3."""
    s3 = state["ports"]["s3"]["s3"]
    return {
        "PREFECT_API_URL": _api_url(state),
        "PREFECT_UI_URL": _ui_url(state),
        "PREFECT_API_AUTH_STRING": secret["PREFECT_API_AUTH_STRING"],
        "PREFECT_HOME": str(stack.prefect_home / "client"),
        "AWS_ACCESS_KEY_ID": secret["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": secret["AWS_SECRET_ACCESS_KEY"],
        "AWS_ENDPOINT_URL_S3": f"http://{HOST}:{s3}",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }


def api(state: dict[str, Any], secret: dict[str, str] | None, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """One Prefect REST call (Basic auth with the stack's auth string when ``secret``).

    A 502 or 503 answer (on SQLite, a locked database: the request was rolled back) is retried up to
    :data:`API_RETRIES` times, 1, 2, 4 s apart, as Prefect's own client does."""
    data = None if body is None else json.dumps(body).encode()
    attempt = 0
    while True:
        req = urllib.request.Request(_api_url(state) + path, data=data, method=method, headers={"Content-Type": "application/json"})
        if secret:
            token = base64.b64encode(secret["PREFECT_API_AUTH_STRING"].encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            if exc.code in (502, 503) and attempt < API_RETRIES:
                time.sleep(2**attempt)
                attempt += 1
                continue
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")


API_RETRIES = 3


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    log = open(stack.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    log.write(f"\n===== nst stack: starting {name} at {time.ctime()} =====\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    stack.record_pid(name, proc.pid)
    return proc.pid


def _log_tail(stack: Stack, name: str, lines: int = 25) -> str:
    try:
        return "\n".join((stack.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(what: str, check, timeout: float, alive=None, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise StackError(f"{what}: the process exited")
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    raise StackError(f"{what}: not ready after {timeout:.0f} s" + (f" (last: {last})" if last else ""))


# ----------------------------------------------------------------------------- S3 contents


def s3_manifest(text: str, manifest_dir: Path, images_dir: Path, bucket: str) -> str:
    """A manifest whose local paths into ``images_dir`` become ``s3://bucket/images/...`` URIs."""
    images_dir = images_dir.resolve()
    reader = csv.DictReader(io.StringIO(text))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=reader.fieldnames or [], lineterminator="\n")
    writer.writeheader()
    for row in reader:
        for column in PATH_COLUMNS:
            value = (row.get(column) or "").strip()
            if not value or "://" in value or value in ("content", "noise", "style", "imagenet") or value.startswith("random:"):
                continue
            path = (manifest_dir / value).resolve()
            with contextlib.suppress(ValueError):
                row[column] = f"s3://{bucket}/images/{path.relative_to(images_dir).as_posix()}"
        writer.writerow(row)
    return out.getvalue()


def upload_samples(server: S3Server, bucket: str) -> list[str]:
    """Create ``bucket`` (if missing) and put the sample images and the s3:// manifests into it."""
    from botocore.exceptions import ClientError

    client = server.client()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)
    if not SAMPLE_IMAGES.is_dir():
        raise StackError(f"sample images not found in {SAMPLE_IMAGES}")
    for path in sorted(SAMPLE_IMAGES.iterdir()):
        if path.is_file() and path.suffix not in (".py", ".csv"):  # the images and SOURCES.md, not the package's code
            client.put_object(Bucket=bucket, Key=f"images/{path.name}", Body=path.read_bytes())
    manifests = []
    for path in sorted((REPO / "manifests").glob("*.csv")):
        body = s3_manifest(path.read_text(), path.parent, SAMPLE_IMAGES, bucket)
        client.put_object(Bucket=bucket, Key=f"manifests/{path.name}", Body=body.encode(), ContentType="text/csv")
        manifests.append(f"s3://{bucket}/manifests/{path.name}")
    return manifests


# ----------------------------------------------------------------------------- up


def _start_s3(stack: Stack, state: dict[str, Any], secret: dict[str, str]) -> S3Server:
    ports = state["ports"]["s3"]
    server = S3Server(stack.s3_dir, secret["AWS_ACCESS_KEY_ID"], secret["AWS_SECRET_ACCESS_KEY"], dict(ports), find_weed(), identity="nst-stack-admin", detached=True)
    if stack.running_pid("s3"):
        return server
    try:
        started = start_s3_server(stack.s3_dir, access_key=secret["AWS_ACCESS_KEY_ID"], secret_key=secret["AWS_SECRET_ACCESS_KEY"],
                                  ports=ports, identity="nst-stack-admin", detached=True, timeout=120)  # fmt: skip
    except (RuntimeError, TimeoutError) as exc:
        raise StackError(f"SeaweedFS did not start (ports {sorted(ports.values())}; log {stack.s3_dir / 'weed.log'}): {str(exc).splitlines()[0]}") from None
    assert started.pid is not None
    stack.record_pid("s3", started.pid)
    return started


def _start_prefect_server(stack: Stack, state: dict[str, Any], secret: dict[str, str]) -> None:
    if not stack.running_pid("prefect-server"):
        port = state["ports"]["prefect"]
        if not _port_free(port):
            raise StackError(f"port {port} (Prefect server) is taken by another process; `make down` or free it")
        env = _base_env()
        env.update(
            PREFECT_HOME=str(stack.prefect_home),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{stack.prefect_home / 'prefect.db'}",
            PREFECT_SERVER_API_HOST=HOST,
            PREFECT_SERVER_API_PORT=str(port),
            PREFECT_SERVER_API_AUTH_STRING=secret["PREFECT_API_AUTH_STRING"],
            PREFECT_UI_URL=_ui_url(state),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        )
        cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
        _spawn(stack, "prefect-server", cmd, env, stack.root)
    pid = stack.read_pid("prefect-server")

    def healthy() -> bool:
        status, _ = api(state, None, "GET", "/health", timeout=5)
        return status == 200

    try:
        _wait("Prefect server", healthy, SERVER_START_TIMEOUT, alive=lambda: pid is not None and _is_ours(pid, "server", starting=True), interval=1)
    except StackError as exc:
        raise StackError(f"{exc}; log {stack.logs / 'prefect-server.log'}:\n{_log_tail(stack, 'prefect-server')}") from None
    status, _ = api(state, secret, "GET", "/admin/version")
    if status != 200:
        raise StackError(f"the Prefect server on port {state['ports']['prefect']} refused the stack's auth string (HTTP {status})")


def _prefect_cli(stack: Stack, env: dict[str, str], args: list[str], log_name: str, timeout: float = 300) -> None:
    cmd = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args]
    with open(stack.logs / f"{log_name}.log", "ab") as log:
        log.write(f"\n===== nst stack: {' '.join(args)} at {time.ctime()} =====\n".encode())
        log.flush()
        result = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        raise StackError(f"`prefect {' '.join(args)}` failed (exit {result.returncode}); log {stack.logs / (log_name + '.log')}:\n{_log_tail(stack, log_name)}")


def _ensure_pool(stack: Stack, state: dict[str, Any], secret: dict[str, str], env: dict[str, str]) -> None:
    status, _ = api(state, secret, "GET", f"/work_pools/{POOL}")
    if status == 200:
        return
    _prefect_cli(stack, env, ["work-pool", "create", POOL, "--type", "process"], "deploy")


def _start_worker(stack: Stack, env: dict[str, str]) -> None:
    if stack.running_pid("worker"):
        return
    worker_env = dict(env)
    worker_env.update(PREFECT_WORKER_QUERY_SECONDS="3", PREFECT_WORKER_PREFETCH_SECONDS="5")
    if os.environ.get("TORCH_HOME"):  # the weights cache; the failure webhook goes to the server's block, not here
        worker_env["TORCH_HOME"] = os.environ["TORCH_HOME"]
    cmd = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL, "--name", WORKER_NAME, "--type", "process"]
    _spawn(stack, "worker", cmd, worker_env, REPO)


def _create_alerts(stack: Stack, env: dict[str, str]) -> bool:
    """``nst serve --alerts-only`` against the stack when ``NST_FAILURE_WEBHOOK`` is set (the URL travels in the
    environment, never on a command line). Returns whether the alerts were created."""
    if not os.environ.get("NST_FAILURE_WEBHOOK"):
        return False
    alert_env = dict(env, NST_FAILURE_WEBHOOK=os.environ["NST_FAILURE_WEBHOOK"], PYTHONPATH=str(REPO))
    if os.environ.get("NST_RUN_DEADLINE_HOURS"):
        alert_env["NST_RUN_DEADLINE_HOURS"] = os.environ["NST_RUN_DEADLINE_HOURS"]
    cmd = [sys.executable, "-m", "nst_cli.main", "serve", "--alerts-only"]
    with open(stack.logs / "deploy.log", "ab") as log:
        log.write(f"\n===== nst stack: nst serve --alerts-only at {time.ctime()} =====\n".encode())
        log.flush()
        result = subprocess.run(cmd, cwd=REPO, env=alert_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    if result.returncode != 0:
        raise StackError(f"`nst serve --alerts-only` failed (exit {result.returncode}); log {stack.logs / 'deploy.log'}:\n{_log_tail(stack, 'deploy')}")
    return True


def _wait_worker(stack: Stack, state: dict[str, Any], secret: dict[str, str]) -> None:
    pid = stack.read_pid("worker")

    def online() -> bool:
        status, body = api(state, secret, "POST", f"/work_pools/{POOL}/workers/filter", {})
        return status == 200 and any(w.get("name") == WORKER_NAME and w.get("status") == "ONLINE" for w in body or [])

    try:
        _wait("worker", online, 180, alive=lambda: pid is not None and _is_ours(pid, "worker", starting=True), interval=1)
    except StackError as exc:
        raise StackError(f"{exc}; log {stack.logs / 'worker.log'}:\n{_log_tail(stack, 'worker')}") from None


def write_env_file(stack: Stack, env: dict[str, str]) -> None:
    lines = [
        "# nst local stack: `. .stack/env` points the prefect CLI, boto3 and nst at it. Holds secrets (0600).",
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items() if k != "PREFECT_HOME"]
    _write_private(stack.env_path, "\n".join(lines) + "\n")


def _imagenet_cached() -> bool:
    torch_home = Path(os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch")
    return (torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth").is_file()


def run_command(stack: Stack) -> str:
    """The one command that starts a run on this stack (printed by ``up``)."""
    defaults = {"size": 128, "iterations": 50} if _imagenet_cached() else {"size": 128, "iterations": 50, "weights": "random:0"}
    env_file = os.path.relpath(stack.env_path) if stack.env_path.is_relative_to(Path.cwd()) else str(stack.env_path)
    return (
        f". {shlex.quote(env_file)} && prefect deployment run '{FLOW}/adhoc' "
        f"--param manifest_uri={SCHEDULE_MANIFEST} --param output_uri=s3://{BUCKET}/outputs/adhoc "
        f"--param {shlex.quote('defaults=' + json.dumps(defaults))} --watch"
    )


def up(root: Path = DEFAULT_DIR, *, free_only: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Start (or complete) the stack; returns its state (ports, names; no secrets)."""
    t0 = time.monotonic()
    stack = Stack(Path(root).resolve())
    stack.ensure_dirs()
    secret = stack.ensure_secrets()
    state = stack.load_state()
    state["ports"] = _choose_ports(state, free_only)
    state.update(bucket=BUCKET, pool=POOL, worker=WORKER_NAME, ui_url=_ui_url(state), api_url=_api_url(state),
                 s3_endpoint=f"http://{HOST}:{state['ports']['s3']['s3']}")  # fmt: skip
    stack.save_state(state)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    say(f"nst stack in {stack.root}: starting SeaweedFS S3 ...")
    server = _start_s3(stack, state, secret)
    manifests = upload_samples(server, BUCKET)
    say(f"  S3 ready on {state['s3_endpoint']}; bucket s3://{BUCKET} (images/, manifests/)")

    say(f"  starting the Prefect server on {state['ui_url']} (first start migrates its database: up to a few minutes) ...")
    _start_prefect_server(stack, state, secret)
    env = _base_env()
    env.update(client_env(stack, state, secret))
    write_env_file(stack, client_env(stack, state, secret))
    _ensure_pool(stack, state, secret, env)
    _start_worker(stack, env)  # starts polling while the deployments are applied
    say(f"  work pool {POOL} (process) and its worker started; applying prefect.yaml ...")
    deploy_env = dict(env)
    deploy_env.update(NST_CODE_DIR=str(REPO), NST_SCHEDULE_MANIFEST=SCHEDULE_MANIFEST, NST_SCHEDULE_OUTPUT=SCHEDULE_OUTPUT)
    _prefect_cli(stack, deploy_env, ["deploy", "--all", "--prefect-file", str(PREFECT_YAML)], "deploy")
    state["alerts"] = _create_alerts(stack, env)
    if state["alerts"]:
        say("  server-side alerts created (failed/crashed runs, overdue scheduled runs) -> the nst-failure-webhook block")
    _wait_worker(stack, state, secret)

    deployments = {}
    for name in ("adhoc", "scheduled"):
        status, body = api(state, secret, "GET", f"/deployments/name/{FLOW}/{name}")
        if status != 200:
            raise StackError(f"deployment {FLOW}/{name} was not created (HTTP {status}); log {stack.logs / 'deploy.log'}")
        deployments[name] = body["id"]
    state["deployments"] = deployments
    stack.save_state(state)
    if not quiet:
        print_summary(stack, state, manifests, time.monotonic() - t0)
    return state


def print_summary(stack: Stack, state: dict[str, Any], manifests: list[str], seconds: float) -> None:
    rel = os.path.relpath(stack.root) if stack.root.is_relative_to(Path.cwd()) else str(stack.root)
    print(f"\nnst local stack is up ({seconds:.0f} s). Everything listens on {HOST} only; data stays in {rel}/ across `make down`/`make up`.")
    print(f"  Prefect UI    {state['ui_url']}   (log in with PREFECT_API_AUTH_STRING from {rel}/secrets.env)")
    print(f"  Prefect API   {state['api_url']}   (HTTP Basic auth; `. {rel}/env` sets it up for the prefect CLI)")
    print(f"  S3            {state['s3_endpoint']}   bucket s3://{BUCKET}   (credentials: {rel}/secrets.env)")
    for uri in manifests:
        print(f"                {uri}")
    print(f"  Work pool     {POOL} (process), worker {WORKER_NAME} (pid {stack.read_pid('worker')})")
    print(f"  Deployments   {FLOW}/adhoc       on demand (UI: Deployments > adhoc > Run > Custom run)")
    print(f"                {FLOW}/scheduled   cron '0 2 * * *' UTC, one run at a time: {SCHEDULE_MANIFEST} -> {SCHEDULE_OUTPUT}")
    if state.get("alerts"):
        print("  Alerts        failed/crashed runs and overdue scheduled runs -> the nst-failure-webhook block (Automations page)")
    print(f"  Logs          {rel}/logs/")
    print("\nStart a run:")
    print(f"  {run_command(stack)}")
    print("\nStop everything: make down")


# ----------------------------------------------------------------------------- down / status


def stop_pid(pid: int, marker: str, grace: float) -> bool:
    """SIGTERM the process group led by ``pid`` (we started it with its own session), then SIGKILL."""
    deadline = time.monotonic() + 3
    while _is_ours(pid, "", starting=True) and not _is_ours(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)  # spawned a moment ago: its command line is not there yet
    if not _is_ours(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _is_ours(pid, marker):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # the group: leftovers (uvicorn, flow-run processes) too
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _is_ours(pid, marker):
        time.sleep(0.1)
    return True


def down(root: Path = DEFAULT_DIR, *, quiet: bool = False) -> list[int]:
    """Stop every process of the stack, by its recorded pid; keep the data. Returns the pids stopped."""
    stack = Stack(Path(root).resolve())
    stopped = []
    for name, grace in (("worker", 15.0), ("prefect-server", 20.0), ("s3", 3.0)):
        pid = stack.read_pid(name)
        if pid is None:
            continue
        if stop_pid(pid, PROCESSES[name], grace):
            stopped.append(pid)
            if not quiet:
                print(f"stopped {name} (pid {pid})")
        with contextlib.suppress(OSError):
            stack.pid_path(name).unlink()
    state = stack.load_state()
    if state.get("ports", {}).get("s3"):
        S3Server(stack.s3_dir, "", "", state["ports"]["s3"], "weed")._remove_sockets()
    if not quiet:
        print(f"nst stack stopped; data kept in {stack.root}" if stopped else f"nst stack in {stack.root}: nothing was running")
    return stopped


def status(root: Path = DEFAULT_DIR) -> int:
    stack = Stack(Path(root).resolve())
    state = stack.load_state()
    if not state:
        print(f"no stack in {stack.root} (make up)")
        return 1
    up_count = 0
    for name in PROCESSES:
        pid = stack.running_pid(name)
        up_count += pid is not None
        print(f"  {name:<15} {'running, pid ' + str(pid) if pid else 'stopped'}")
    print(f"  Prefect UI      {state.get('ui_url')}\n  S3              {state.get('s3_endpoint')} (bucket s3://{state.get('bucket')})")
    return 0 if up_count == len(PROCESSES) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description="The nst local stack (127.0.0.1 only).")
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("NST_STACK_DIR", DEFAULT_DIR)), help="stack folder (default .stack/)")
    parser.add_argument("--free-ports", action="store_true", help="pick free ports instead of 4200/8333 (first start only; ports are kept)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            try:
                up(args.dir, free_only=args.free_ports, quiet=args.quiet)
            except BaseException:
                print("nst stack: `up` failed; stopping what it started (data kept)", file=sys.stderr)
                down(args.dir, quiet=True)
                raise
            return 0
        if args.command == "down":
            down(args.dir, quiet=args.quiet)
            return 0
        return status(args.dir)
    except StackError as exc:
        print(f"nst stack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
