"""Shared pytest fixtures.

==============================================================================
 S3 fixtures (real SeaweedFS server, see tests/s3server.py)
------------------------------------------------------------------------------
 s3_server  (session)  one SeaweedFS S3 server on 127.0.0.1, free ports, auth
                       on; started at first use, stopped at the end of the
                       session. Has .endpoint_url, .access_key, .secret_key,
                       .env(), .client(), .stop()/.start() (same ports and
                       data, for tests that take S3 away mid-run: such a test
                       must leave it running again when it ends).
 s3_env     (function) AWS_* variables pointing boto3 and nst_core.storage at
                       s3_server (AWS_MAX_ATTEMPTS=2, AWS_RETRY_MODE=standard);
                       resets nst_core.storage's cached client before and after.
 s3_bucket  (function) a fresh, uniquely named, empty bucket on s3_server
                       (implies s3_env); yields its name.

 Prefect
------------------------------------------------------------------------------
 prefect_server (session) one temporary Prefect server (SQLite) for the whole
                       session (prefect_test_harness); flows in tests run
                       against it. PREFECT_HOME is a temp folder; analytics off.
 sample_images          the folder of sample images (the nst_samples package,
                       in the repository).
 tubingen, starry, shipwreck (session) the decoded sample images (PIL, RGB).
 net        (session)  the VGG-19 with random:0 weights on the CPU (the engine
                       tests' network; load_network caches it per process).

 Hugging Face datasets: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set and HF_HOME a
 temp folder, before anything imports it: load_dataset never downloads.

 Other fixtures are added below this block; keep each one documented here or
 next to its definition.
==============================================================================
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Before anything imports Prefect: a private PREFECT_HOME and quiet, offline settings.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="nst-prefect-home-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Hugging Face datasets (the export tests load exports with it): never the network, a private cache.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="nst-hf-home-"))

from s3server import S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server for the whole test session."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """Point boto3 (through AWS_* variables only) at ``s3_server``; yields the server."""
    from nst_core import storage  # imported here: nst_core's package import is not free

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    storage.reset_clients()
    try:
        yield s3_server
    finally:
        storage.reset_clients()


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A fresh, empty bucket on the test S3 server; returns its name."""
    name = f"nst-test-{uuid.uuid4().hex[:16]}"
    s3_env.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (SQLite) shared by every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(scope="session")
def sample_images() -> Path:
    """The sample images folder (the ``nst_samples`` package)."""
    from helpers import sample_images_dir

    folder = sample_images_dir()
    if not (folder / "tubingen.jpg").is_file():
        pytest.fail(f"sample images not found in {folder} (the nst_samples package is incomplete)")
    return folder


@pytest.fixture(scope="session")
def tubingen(sample_images: Path):
    from nst_core import images

    return images.load_image(sample_images / "tubingen.jpg")


@pytest.fixture(scope="session")
def starry(sample_images: Path):
    from nst_core import images

    return images.load_image(sample_images / "starry_night.jpg")


@pytest.fixture(scope="session")
def shipwreck(sample_images: Path):
    from nst_core import images

    return images.load_image(sample_images / "shipwreck.jpg")


@pytest.fixture(scope="session")
def net():
    from nst_core.network import load_network

    return load_network("random:0", device="cpu")
