"""Tests of nst_core.storage against local files and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import pytest

from nst_core import storage
from nst_core.storage import (
    AccessDenied,
    InvalidUri,
    NoSuchBucket,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    UnsupportedUri,
)

REPO = Path(__file__).resolve().parents[2]


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".nst-tmp")]


def _render_everything(exc: BaseException) -> str:
    """Every way an exception is commonly shown or logged."""
    return "\n".join(
        [
            str(exc),
            repr(exc),
            "".join(traceback.format_exception(exc)),
            repr(exc.args),
            repr(vars(exc)),
        ]
    )


# ---------------------------------------------------------------- parsing, join


def test_parse_s3_file_and_plain_paths(tmp_path: Path) -> None:
    p = storage.parse_uri("s3://my-bucket/a/b/c.png")
    assert (p.scheme, p.bucket, p.key, p.path) == ("s3", "my-bucket", "a/b/c.png", None)
    assert p.uri == "s3://my-bucket/a/b/c.png"

    assert storage.parse_uri("s3://my-bucket").key == ""
    assert storage.parse_uri("S3://my-bucket/k").scheme == "s3"

    f = storage.parse_uri("file:///data/my%20img.png")
    assert (f.scheme, f.path, f.bucket, f.key) == ("file", Path("/data/my img.png"), None, None)
    assert f.uri == "file:///data/my%20img.png"
    assert storage.parse_uri("file://localhost/x/y").path == Path("/x/y")

    assert storage.parse_uri("relative/dir/x.jpg").path == Path("relative/dir/x.jpg")
    assert storage.parse_uri(str(tmp_path / "x")).path == tmp_path / "x"
    assert storage.parse_uri(tmp_path / "x").path == tmp_path / "x"
    assert storage.parse_uri("~/x").path == Path.home() / "x"

    assert storage.is_s3("s3://my-bucket/k") and not storage.is_local("s3://my-bucket/k")
    assert storage.is_local("/abs/x") and storage.is_local("rel/x") and storage.is_local("file:///x")
    assert not storage.is_s3("https://example.com/x") and not storage.is_local("https://example.com/x")
    assert not storage.is_s3("s3://Bad_Bucket/x")


@pytest.mark.parametrize(
    "uri, scheme",
    [
        ("http://example.com/a.png", "http"),
        ("https://example.com/a.png", "https"),
        ("gs://bucket/a.png", "gs"),
        ("ftp://host/a.png", "ftp"),
        ("abfs://container@account.dfs.core.windows.net/a", "abfs"),
        ("s3a://bucket/a.png", "s3a"),
    ],
)
def test_unsupported_schemes_refused(uri: str, scheme: str, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedUri, match=f"'{scheme}'") as info:
        storage.parse_uri(uri)
    assert isinstance(info.value, ValueError)
    for op in (storage.read_bytes, storage.exists, storage.delete, storage.list_prefix, storage.fetch_to_cache):
        with pytest.raises(UnsupportedUri):
            op(uri)
    with pytest.raises(UnsupportedUri):
        storage.write_bytes(uri, b"x")
    with pytest.raises(UnsupportedUri):
        storage.write_bytes_if_absent(uri, b"x")


def test_presigned_url_secrets_not_echoed() -> None:
    url = (
        "https://bucket.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20240101&X-Amz-Signature=deadbeefcafe"
    )
    with pytest.raises(UnsupportedUri) as info:
        storage.read_bytes(url)
    text = str(info.value)
    assert "https" in text and "a.png" in text
    for secret in ("X-Amz", "AKIAEXAMPLE", "deadbeefcafe", "?"):
        assert secret not in text
    with pytest.raises(UnsupportedUri) as info2:
        storage.parse_uri("ftp://user:hunter2@host/file")
    assert "hunter2" not in str(info2.value)
    assert storage.sanitize_uri("https://u:pw@h/p?sig=1#f") == "https://***@h/p"


@pytest.mark.parametrize(
    "bucket",
    ["ab", "Upper", "under_score", "-leading", "trailing-", "a" * 64, "dots..dots", "192.168.1.1", ""],
)
def test_bad_bucket_names_refused(bucket: str) -> None:
    with pytest.raises(InvalidUri, match="bucket"):
        storage.parse_uri(f"s3://{bucket}/key")


def test_object_operations_need_a_key(tmp_path: Path) -> None:
    for uri in ("s3://my-bucket", "s3://my-bucket/", "s3://my-bucket/dir/"):
        with pytest.raises(InvalidUri):
            storage.read_bytes(uri)
        with pytest.raises(InvalidUri):
            storage.write_bytes(uri, b"x")
    with pytest.raises(InvalidUri):
        storage.write_bytes(str(tmp_path) + "/", b"x")
    with pytest.raises(InvalidUri):
        storage.parse_uri("")
    with pytest.raises(InvalidUri):
        storage.parse_uri("s3://my-bucket/k?versionId=1")


def test_join() -> None:
    assert storage.join("s3://b-1/out/", "/run1/", "item.png") == "s3://b-1/out/run1/item.png"
    assert storage.join("s3://b-1/out", "run1", "item.png") == "s3://b-1/out/run1/item.png"
    assert storage.join("s3://b-1", "a", "b") == "s3://b-1/a/b"
    assert storage.join("s3://b-1/", "a//b") == "s3://b-1/a/b"
    assert storage.join("/data/out/", "run1/", "/item.png") == "/data/out/run1/item.png"
    assert storage.join("rel", "x") == "rel/x"
    assert storage.join("/", "x") == "/x"
    assert storage.join("file:///data/my dir", "a b.png") == "file:///data/my%20dir/a%20b.png"
    assert storage.parse_uri(storage.join("file:///d", "100%.png")).path == Path("/d/100%.png")
    assert storage.join("s3://b-1/out", "", "x") == "s3://b-1/out/x"
    for bad in ("..", "a/../b", "./x"):
        with pytest.raises(InvalidUri):
            storage.join("s3://b-1/out", bad)


def test_sha256_bytes() -> None:
    assert storage.sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert storage.sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_errors_are_one_line_and_picklable() -> None:
    err = ObjectNotFound("s3://b-1/k?X-Amz-Signature=abc", "object\nnot found")
    assert str(err) == "s3://b-1/k: object not found"
    assert err.uri == "s3://b-1/k" and err.transient is False
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is ObjectNotFound and str(clone) == str(err) and clone.transient is False
    t = pickle.loads(pickle.dumps(TransientStorageError("s3://b-1/k", "down")))
    assert t.transient is True and isinstance(t, StorageError)
    assert StorageError("x", "y", transient=True).transient is True
    assert AccessDenied("x", "y").transient is False and NoSuchBucket("x", "y").transient is False


def test_import_is_cheap() -> None:
    """storage.py itself imports neither boto3, torch nor Prefect (boto3 comes lazily)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('st', {str(REPO / 'nst_core' / 'storage.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['st'] = m; spec.loader.exec_module(m)\n"
        "bad = [n for n in ('boto3', 'botocore', 'torch', 'prefect') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- local files


def test_local_round_trip_overwrite_and_parents(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "x.bin"
    storage.write_bytes(str(target), b"one")
    assert storage.read_bytes(str(target)) == b"one"
    storage.write_bytes(target, b"two, longer")
    assert storage.read_bytes(target) == b"two, longer"
    storage.write_bytes(str(target), b"")
    assert storage.read_bytes(str(target)) == b""
    uri = storage.join("file://" + str(tmp_path), "with space", "f.txt")
    storage.write_bytes(uri, b"via file uri")
    assert (tmp_path / "with space" / "f.txt").read_bytes() == b"via file uri"
    assert storage.read_bytes(uri) == b"via file uri"
    assert _tmp_files(tmp_path) == []


def test_local_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("rel/a.txt", b"a")
    assert (tmp_path / "rel" / "a.txt").read_bytes() == b"a"
    assert storage.exists("rel/a.txt")
    assert storage.list_prefix("rel/") == ["rel/a.txt"]
    assert storage.list_prefix("re") == ["rel/a.txt"]


def test_local_write_is_whole_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "meta.json"
    storage.write_bytes(target, b"old content")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="ENOSPC") as info:
        storage.write_bytes(target, b"new content that never lands")
    assert str(target) in str(info.value)
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]
    assert _tmp_files(tmp_path) == []
    with pytest.raises(TypeError):
        storage.write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert _tmp_files(tmp_path) == []


def test_local_missing_and_exists_and_delete(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "x.png"
    with pytest.raises(ObjectNotFound) as info:
        storage.read_bytes(str(missing))
    assert str(missing) in str(info.value) and info.value.transient is False
    assert info.value.uri == str(missing)
    assert not storage.exists(missing)
    storage.write_bytes(tmp_path / "a.txt", b"a")
    assert storage.exists(tmp_path / "a.txt")
    assert not storage.exists(tmp_path / "a.txt" / "child")
    (tmp_path / "adir").mkdir()
    assert not storage.exists(tmp_path / "adir")
    storage.delete(tmp_path / "a.txt")
    assert not storage.exists(tmp_path / "a.txt")
    storage.delete(tmp_path / "a.txt")  # deleting what is gone is fine


def test_local_list_prefix(tmp_path: Path) -> None:
    for rel in ("out/item1/a.png", "out/item1/meta.json", "out/item2/a.png", "out2/x", "other/y"):
        storage.write_bytes(tmp_path / rel, b"x")
    (tmp_path / "out" / "item2" / ".a.png.123.nst-tmp").write_bytes(b"partial")
    base = str(tmp_path)
    assert storage.list_prefix(base + "/out/") == [
        f"{base}/out/item1/a.png",
        f"{base}/out/item1/meta.json",
        f"{base}/out/item2/a.png",
    ]
    assert storage.list_prefix(base + "/out") == [
        f"{base}/out/item1/a.png",
        f"{base}/out/item1/meta.json",
        f"{base}/out/item2/a.png",
        f"{base}/out2/x",
    ]
    assert storage.list_prefix(base + "/out/item1/m") == [f"{base}/out/item1/meta.json"]
    assert storage.list_prefix(base + "/missing/dir/") == []
    assert storage.list_prefix("file://" + base + "/out/item2/") == [f"file://{base}/out/item2/a.png"]


def test_local_conditional_create(tmp_path: Path) -> None:
    lease = tmp_path / "leases" / "item.lease"
    assert storage.write_bytes_if_absent(lease, b"first") is True
    assert storage.write_bytes_if_absent(lease, b"second") is False
    assert lease.read_bytes() == b"first"
    assert _tmp_files(tmp_path) == []


def test_local_conditional_create_has_one_winner(tmp_path: Path) -> None:
    target = tmp_path / "race.lease"
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        results.append(storage.write_bytes_if_absent(target, f"owner {i}".encode()))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert target.read_bytes().startswith(b"owner ")
    assert _tmp_files(tmp_path) == []


def test_local_fetch_to_cache(tmp_path: Path) -> None:
    f = tmp_path / "img.png"
    f.write_bytes(b"png")
    assert storage.fetch_to_cache(str(f)) == f
    assert storage.fetch_to_cache("file://" + str(f)) == f
    with pytest.raises(ObjectNotFound, match=r"missing\.png"):
        storage.fetch_to_cache(str(tmp_path / "missing.png"))


def test_local_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "secret.bin"
    f.write_bytes(b"x")

    def refuse(self: Path) -> bytes:  # root ignores modes, so simulate the refusal
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(AccessDenied, match="permission denied") as info:
        storage.read_bytes(f)
    assert info.value.uri == str(f) and info.value.transient is False


# ---------------------------------------------------------------- S3 client config


def test_client_configuration_from_env(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    client = storage._s3_client()
    assert client is storage._s3_client()  # cached
    assert client.meta.endpoint_url == s3_env.endpoint_url
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.region_name == "us-east-1"
    assert client.meta.config.retries["mode"] == "standard"
    assert client.meta.config.retries["total_max_attempts"] == 2

    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_RETRY_MODE")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    storage.reset_clients()
    fresh = storage._s3_client()
    assert fresh is not client
    assert fresh.meta.region_name == "us-east-1"
    assert fresh.meta.config.retries["mode"] == "standard"
    assert fresh.meta.config.retries["total_max_attempts"] == 5

    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    storage.reset_clients()
    assert storage._s3_client().meta.config.retries["mode"] == "adaptive"


def test_unreachable_endpoint_is_transient(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3server import free_ports

    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.reset_clients()
    with pytest.raises(TransientStorageError) as info:
        storage.read_bytes("s3://some-bucket/k.png")
    assert info.value.transient is True
    assert "s3://some-bucket/k.png" in str(info.value)
    assert s3_env.secret_key not in _render_everything(info.value)


# ---------------------------------------------------------------- S3 objects


def test_s3_round_trip_and_overwrite(s3_bucket: str, s3_server) -> None:
    uri = f"s3://{s3_bucket}/dir/sub/photo.png"
    storage.write_bytes(uri, b"\x89PNG first")
    assert storage.read_bytes(uri) == b"\x89PNG first"
    payload = os.urandom(300_000)
    storage.write_bytes(uri, payload)
    assert storage.read_bytes(uri) == payload
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="dir/sub/photo.png")
    assert head["ContentType"] == "image/png"

    storage.write_bytes(f"s3://{s3_bucket}/data.bin", b"", content_type="application/x-nst")
    assert storage.read_bytes(f"s3://{s3_bucket}/data.bin") == b""
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="data.bin")
    assert head["ContentType"] == "application/x-nst"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_refuses_an_object_over_max_bytes_unread(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    base = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"
    uri = storage.join(base, "in", "big.png")
    storage.write_bytes(uri, b"x" * 1000)
    assert storage.read_bytes(uri, max_bytes=1000) == b"x" * 1000  # the limit itself is allowed
    with pytest.raises(storage.ObjectTooLarge) as info:
        storage.read_bytes(uri, max_bytes=999)
    assert not info.value.transient and "1,000 bytes, more than the 999-byte limit" in str(info.value)
    assert uri.removeprefix("file://") in str(info.value) or storage.sanitize_uri(uri) in str(info.value)
    assert info.value.__context__ is None  # nothing of boto3's error rides along


def test_s3_exists_and_delete(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/a/meta.json"
    assert storage.exists(uri) is False
    storage.write_bytes(uri, b"{}")
    assert storage.exists(uri) is True
    assert storage.exists(f"s3://{s3_bucket}/a/meta.jso") is False
    storage.delete(uri)
    assert storage.exists(uri) is False
    storage.delete(uri)  # already gone: fine


def test_s3_list_prefix_recursive_and_paginated(
    s3_bucket: str, s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = ["out/item1/a.png", "out/item1/meta.json", "out/item2/a.png", "out/item3/x/y/z.csv", "out2/b", "c"]
    for key in keys:
        storage.write_bytes(f"s3://{s3_bucket}/{key}", key.encode())
    s3_server.client().put_object(Bucket=s3_bucket, Key="out/folder-marker/", Body=b"")
    monkeypatch.setattr(storage, "_LIST_PAGE_SIZE", 2)  # force several pages
    assert storage.list_prefix(f"s3://{s3_bucket}/out/") == [
        f"s3://{s3_bucket}/out/item1/a.png",
        f"s3://{s3_bucket}/out/item1/meta.json",
        f"s3://{s3_bucket}/out/item2/a.png",
        f"s3://{s3_bucket}/out/item3/x/y/z.csv",
    ]
    assert storage.list_prefix(f"s3://{s3_bucket}/out") == [
        f"s3://{s3_bucket}/out/item1/a.png",
        f"s3://{s3_bucket}/out/item1/meta.json",
        f"s3://{s3_bucket}/out/item2/a.png",
        f"s3://{s3_bucket}/out/item3/x/y/z.csv",
        f"s3://{s3_bucket}/out2/b",
    ]
    assert storage.list_prefix(f"s3://{s3_bucket}") == sorted(f"s3://{s3_bucket}/{k}" for k in keys)
    assert storage.list_prefix(f"s3://{s3_bucket}/nothing-here/") == []
    # Every listed URI reads back.
    for uri in storage.list_prefix(f"s3://{s3_bucket}/out/item1/"):
        assert storage.read_bytes(uri) == uri.split("/", 3)[3].encode()


def test_s3_missing_object(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/no/such/key.png"
    with pytest.raises(ObjectNotFound) as info:
        storage.read_bytes(uri)
    assert uri in str(info.value)
    assert info.value.uri == uri and info.value.transient is False
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_s3_missing_bucket(s3_env) -> None:
    uri = "s3://nst-no-such-bucket-4711/k.png"
    with pytest.raises(NoSuchBucket, match="nst-no-such-bucket-4711") as info:
        storage.read_bytes(uri)
    assert uri in str(info.value) and info.value.transient is False
    with pytest.raises(NoSuchBucket):
        storage.write_bytes(uri, b"x")
    with pytest.raises(NoSuchBucket):
        storage.write_bytes_if_absent(uri, b"x")
    with pytest.raises(NoSuchBucket):
        storage.list_prefix("s3://nst-no-such-bucket-4711/out/")
    with pytest.raises(NoSuchBucket):
        storage.fetch_to_cache(uri)
    assert storage.exists(uri) is False  # a HEAD cannot tell; documented


@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_s3_wrong_credentials_refused_without_leaking(
    s3_bucket: str, s3_server, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    uri = f"s3://{s3_bucket}/k.txt"
    storage.write_bytes(uri, b"private")
    wrong_secret = "WrongSecret-" + "Zq9" * 10
    wrong_key = "AKWRONGKEY" + "7" * 10
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    storage.reset_clients()

    operations = [
        lambda: storage.read_bytes(uri),
        lambda: storage.write_bytes(uri, b"overwrite"),
        lambda: storage.write_bytes_if_absent(f"s3://{s3_bucket}/new.txt", b"x"),
        lambda: storage.list_prefix(f"s3://{s3_bucket}/"),
        lambda: storage.exists(uri),
        lambda: storage.delete(uri),
    ]
    for op in operations:
        with pytest.raises(AccessDenied) as info:
            op()
        err = info.value
        assert err.transient is False
        assert s3_bucket in str(err)
        rendered = _render_everything(err) + "\n" + str(info.getrepr(style="long"))
        for secret in (wrong_secret, s3_server.secret_key):
            assert secret not in rendered
        assert "Signature=" not in rendered and "X-Amz" not in rendered
        assert err.__cause__ is None and err.__context__ is None
    with pytest.raises(AccessDenied, match="credentials refused"):
        storage.read_bytes(uri)

    # The right credentials still work, and nothing was overwritten.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    storage.reset_clients()
    assert storage.read_bytes(uri) == b"private"


def test_s3_conditional_create(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/leases/item-1.lease"
    assert storage.write_bytes_if_absent(uri, b"owner A") is True
    assert storage.write_bytes_if_absent(uri, b"owner B") is False
    assert storage.read_bytes(uri) == b"owner A"
    storage.delete(uri)
    assert storage.write_bytes_if_absent(uri, b"owner C") is True
    assert storage.read_bytes(uri) == b"owner C"


def test_s3_conditional_create_has_one_winner(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/leases/race.lease"
    storage.write_bytes(f"s3://{s3_bucket}/warmup", b"x")  # volume allocated before the race
    n = 12
    barrier = threading.Barrier(n)
    results: list[bool | str] = []

    winners: list[int] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            won = storage.write_bytes_if_absent(uri, f"owner {i}".encode())
        except TransientStorageError as exc:  # AWS may answer 409 to concurrent conditional writes
            results.append(f"transient: {exc}")
            return
        results.append(won)
        if won:
            winners.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1, results
    assert storage.read_bytes(uri) == f"owner {winners[0]}".encode()  # losers wrote nothing


def test_s3_fetch_to_cache(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{s3_bucket}/styles/starry night.jpg"
    storage.write_bytes(uri, b"version 1")
    cache = tmp_path / "cache"
    path = storage.fetch_to_cache(uri, cache)
    assert path.parent == cache and path.name.endswith("-starry_night.jpg")
    assert path.read_bytes() == b"version 1"
    mtime = path.stat().st_mtime_ns
    assert storage.fetch_to_cache(uri, cache) == path  # cached: no second download
    assert path.stat().st_mtime_ns == mtime
    assert _tmp_files(cache) == []

    storage.write_bytes(uri, b"version 2, changed")
    path2 = storage.fetch_to_cache(uri, cache)
    assert path2 != path and path2.read_bytes() == b"version 2, changed"

    monkeypatch.setenv("NST_CACHE_DIR", str(tmp_path / "envcache"))
    assert storage.default_cache_dir() == tmp_path / "envcache"
    path3 = storage.fetch_to_cache(uri)
    assert path3.parent == tmp_path / "envcache" and path3.read_bytes() == b"version 2, changed"

    with pytest.raises(ObjectNotFound, match=r"missing\.jpg"):
        storage.fetch_to_cache(f"s3://{s3_bucket}/styles/missing.jpg", cache)


def test_s3_server_restart_keeps_data(s3_bucket: str, s3_server) -> None:
    """The fixture's stop()/start() pair works and data survives it (used by reliability tests)."""
    uri = f"s3://{s3_bucket}/survives.txt"
    storage.write_bytes(uri, b"still here")
    s3_server.kill()
    try:
        with pytest.raises(TransientStorageError):
            storage.read_bytes(uri)
    finally:
        s3_server.start()
    assert storage.read_bytes(uri) == b"still here"
