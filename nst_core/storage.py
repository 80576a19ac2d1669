"""Read and write bytes by URI: ``s3://bucket/key`` through boto3, or local paths.

This is the one module of ``nst_core`` that talks to object storage. It imports
neither Prefect nor torch, and imports boto3 only when an S3 URI is first used,
so importing it is cheap.

Addresses
    ``s3://bucket/key``   an S3 object (any S3-compatible server: AWS, MinIO, SeaweedFS)
    ``file:///abs/path``  a local file (percent-encoded, as RFC 8089 says)
    ``/abs/path``, ``rel/path``, ``~/path``  a local file
    Every other scheme (``http://``, ``https://``, ``gs://``, ...) is refused
    with :class:`UnsupportedUri`.

S3 configuration
    Only boto3's own configuration is used: ``AWS_*`` environment variables,
    ``~/.aws/config`` profiles (``AWS_PROFILE``), ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL`` for MinIO or SeaweedFS, ``AWS_MAX_ATTEMPTS`` and
    ``AWS_RETRY_MODE``. On top of that, this module only fills gaps: region
    ``us-east-1`` when none is configured, retry mode ``standard`` when none is
    configured, and path-style addressing when the endpoint is not AWS's own
    (SeaweedFS and most MinIO setups need it). One client is made per process
    and shared between threads (boto3 clients are thread-safe); call
    :func:`reset_clients` after changing the environment.

Errors
    Every failure is a :class:`StorageError` whose message is one line naming
    the URI and the reason, and whose ``transient`` flag says whether retrying
    later can help. Messages never contain credentials, signatures or query
    strings, and the boto3 exception is neither chained nor kept as context
    (errors are raised outside the ``except`` block), so a traceback does not
    leak them either.

Writes are whole or absent: a local write goes to a temporary file in the
target's directory and is renamed into place; an S3 PUT is atomic by nature.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mimetypes
import os
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

__all__ = [
    "AccessDenied",
    "InvalidUri",
    "NoSpace",
    "NoSuchBucket",
    "ObjectNotFound",
    "ParsedUri",
    "StorageError",
    "TransientStorageError",
    "UnsupportedUri",
    "default_cache_dir",
    "delete",
    "exists",
    "fetch_to_cache",
    "is_local",
    "is_s3",
    "join",
    "list_prefix",
    "parse_uri",
    "read_bytes",
    "reset_clients",
    "sanitize_cells",
    "sanitize_text",
    "sanitize_uri",
    "sha256_bytes",
    "sha256_stream",
    "stat",
    "check_size",
    "ObjectStat",
    "write_bytes",
    "write_bytes_if_absent",
    "create_versioned",
    "delete_if_version",
    "read_versioned",
    "replace_if_version",
    "reserve_space",
]

# Temporary files of atomic local writes are named ".<name>.<random>.nst-tmp";
# list_prefix never reports them.
_TMP_SUFFIX = ".nst-tmp"
_DEFAULT_REGION = "us-east-1"
_DEFAULT_RETRY_MODE = "standard"
_LIST_PAGE_SIZE = 1000
_MAX_KEY_BYTES = 1024


# --------------------------------------------------------------------------- errors


class InvalidUri(ValueError):
    """A string that is not a usable storage address (bad bucket name, empty key...)."""


class UnsupportedUri(InvalidUri):
    """A URI with a scheme this module does not serve (``http``, ``gs``, ``ftp``...)."""


class StorageError(Exception):
    """Reading or writing an address failed.

    Attributes:
        uri: the address at fault, with any query string or user info removed.
        reason: one line saying why.
        transient: True when trying again later may succeed (server down,
            timeout, throttling, 5xx); False when it will not (missing object,
            missing bucket, refused credentials).
    """

    transient: bool = False

    def __init__(self, uri: str, reason: str, transient: bool | None = None) -> None:
        self.uri = sanitize_uri(uri)
        self.reason = _one_line(reason)
        if transient is not None:
            self.transient = transient
        super().__init__(self.uri, self.reason)

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, {self.reason!r}, transient={self.transient})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the error picklable across processes (Prefect / Dask workers).
        return (type(self), (self.uri, self.reason, self.transient))


class ObjectNotFound(StorageError):
    """The object (or local file) does not exist."""

    transient = False


class AccessDenied(StorageError):
    """Credentials missing or refused, or the identity may not do this."""

    transient = False


class NoSuchBucket(StorageError):
    """The S3 bucket does not exist."""

    transient = False


class ObjectTooLarge(StorageError):
    """The object is larger than the caller accepts (checked before its bytes are read)."""

    transient = False


class NoSpace(StorageError):
    """A local file system is full (ENOSPC), over a quota (EDQUOT), or a file over its size limit (EFBIG)."""

    transient = False


class TransientStorageError(StorageError):
    """A failure that may go away: endpoint unreachable, timeout, throttling, 5xx."""

    transient = True


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# Credential-looking parts are found by content, whatever the scheme (or its absence: a
# pasted "s3//KEY:SECRET@bucket/key", "s3 ://...", a presigned URL without its scheme).
_TOKEN_SPLIT = re.compile(r"""([\s"'<>|,;()\[\]{}`]+)""")
_HAS_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_CREDENTIAL_PARAM = re.compile(
    r"(?i)((?:x-amz-)?(?:credential|signature|security-token|session-token|token|secret|password|passwd|pwd"
    r"|access[-_]?key(?:[-_]?id)?|awsaccesskeyid|sig|key))=[^&\s\"'<>|]*"
)
_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA)[A-Z0-9]{16}(?![A-Z0-9])")


def _sanitize_token(token: str) -> str:
    """One address-like token without query string (when it looks like one) or user info."""
    if _HAS_SCHEME.match(token):
        token = token.split("?", 1)[0].split("#", 1)[0]
    elif "?" in token and "=" in token.split("?", 1)[1]:
        token = token.split("?", 1)[0]  # a query string without a scheme: a pasted presigned URL
    return _without_userinfo_anywhere(token)


def _without_userinfo_anywhere(token: str) -> str:
    """Mask what stands before the last ``@`` when it looks like ``user[:password]``.

    After a ``//`` (well-formed or not: ``s3//``, ``s3 ://``) an authority with
    ``@`` or ``:`` in it is user info up to the last ``@`` (a secret may hold
    ``/``, so not only up to the next slash). Without ``//`` (a path that a
    normalisation collapsed) the segment holding a ``:`` before the last ``@``
    starts the user info. ``logo@2x.png`` has neither and stays.
    """
    at = token.rfind("@")
    if at < 0:
        return token
    head = token[:at]
    slashes = head.find("//")
    if slashes >= 0:
        start = slashes + 2
        netloc_end = head.find("/", start)
        netloc = head[start:] if netloc_end < 0 else head[start:netloc_end]
        if netloc_end >= 0 and ":" not in netloc and "@" not in netloc:
            return token  # an '@' in the path of a plain address
        return token[:start] + "***" + token[at:]
    colon = head.find(":")
    if colon < 0:
        return token
    start = head.rfind("/", 0, colon) + 1
    return token[:start] + "***" + token[at:]


def _mask_credentials(text: str) -> str:
    """``text`` with its credential-looking parts masked and everything else (whitespace too) as it was."""
    parts = _TOKEN_SPLIT.split(text)
    cleaned = "".join(part if i % 2 else _sanitize_token(part) for i, part in enumerate(parts))
    cleaned = _CREDENTIAL_PARAM.sub(lambda m: m.group(1) + "=***", cleaned)
    return _AWS_KEY_ID.sub("***", cleaned)


def sanitize_uri(uri: str) -> str:
    """Return ``uri`` fit for a message or a stored cell: no query string, fragment or user info.

    Decided by content, not by scheme: presigned URLs carry their signature and
    credentials in the query string (cut, also without a scheme, when it holds
    ``name=value``), ``user:password@`` is masked wherever it stands (also in
    ``s3//KEY:SECRET@bucket/key`` or ``s3 ://...``, which are local paths to the
    parser), credential parameters (``X-Amz-Signature=``, ``password=``...)
    anywhere lose their value, and AWS access key ids are masked. Other local
    paths come back unchanged.
    """
    return _mask_credentials(_one_line(str(uri)))


def sanitize_cells(value: T) -> T:
    """``value`` with credential-looking parts masked in every string in it (dicts, lists and tuples walked).

    For records built from manifest cells (results rows, ``meta.json``): whatever a
    cell holds, its credential-looking parts never leave it; the rest of it is kept
    as it was (whitespace too, unlike :func:`sanitize_uri`).
    """
    if isinstance(value, str):
        return _mask_credentials(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: sanitize_cells(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        return type(value)(sanitize_cells(v) for v in value)
    return value


def sanitize_text(text: str, limit: int = 300) -> str:
    """A message fit to record: one line, sanitised as :func:`sanitize_uri` everywhere in it, capped in length."""
    return _sanitize_text(text, limit)


def _sanitize_text(text: str, limit: int = 300) -> str:
    """Sanitise every token of ``text`` and cap its length."""
    cleaned = sanitize_uri(text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


# --------------------------------------------------------------------------- addresses

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


@dataclass(frozen=True)
class ParsedUri:
    """An address split into its parts.

    ``scheme`` is ``"s3"`` (then ``bucket`` and ``key`` are set, ``key`` may be
    ``""`` for a whole-bucket prefix and ``path`` is None) or ``"file"`` (then
    ``path`` is set and ``bucket``/``key`` are None). ``file_uri`` records
    whether a local address was written as ``file://`` so that derived
    addresses (:func:`join`, :func:`list_prefix`) keep the caller's style.
    """

    scheme: Literal["s3", "file"]
    bucket: str | None = None
    key: str | None = None
    path: Path | None = None
    file_uri: bool = False

    @property
    def uri(self) -> str:
        """The canonical string form of this address."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        assert self.path is not None
        if self.file_uri:
            return _path_to_file_uri(str(self.path))
        return str(self.path)


def _path_to_file_uri(path: str) -> str:
    return "file://" + urllib.parse.quote(path, safe="/~!$&'()*+,;=:@-._")


def _without_userinfo(netloc: str) -> str:
    """``user:password@host`` -> ``***@host`` (a netloc quoted in a message never carries a password)."""
    if "@" in netloc:
        return "***@" + netloc.rsplit("@", 1)[1]
    return "***" if ":" in netloc and not re.fullmatch(r"[\w.-]+:\d+", netloc) else netloc  # 'KEY:SECRET' cut at a '/' of the secret


def _validate_bucket(bucket: str, uri: str) -> None:
    if not _BUCKET_RE.match(bucket) or ".." in bucket or _IPV4_RE.match(bucket):
        raise InvalidUri(
            f"{sanitize_uri(uri)}: invalid S3 bucket name {_without_userinfo(bucket)!r} (3-63 characters: "
            "lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit)"
        )


def parse_uri(uri: str | os.PathLike[str]) -> ParsedUri:
    """Split an address into scheme, bucket and key, or local path.

    Accepts ``s3://bucket[/key]``, ``file:///abs/path`` (or
    ``file://localhost/abs/path``) and plain local paths, relative or absolute
    (``~`` is expanded). The S3 key may be empty here (a whole-bucket prefix);
    object operations require a non-empty key.

    Raises:
        UnsupportedUri: any other scheme (``http``, ``https``, ``gs``, ``ftp``...).
        InvalidUri: an empty address, a bad bucket name or an over-long key.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise InvalidUri(f"storage address must be a string or path, not {type(uri).__name__}")
    if not uri.strip():
        raise InvalidUri("empty storage address")
    if "\x00" in uri:
        raise InvalidUri(f"{sanitize_uri(uri)!r}: address contains a NUL byte")

    m = _SCHEME_RE.match(uri)
    if m is None:
        return ParsedUri(scheme="file", path=Path(os.path.expanduser(uri)))

    scheme = m.group(1).lower()
    rest = uri[m.end():]
    if scheme == "s3":
        if "?" in rest or "#" in rest:
            raise InvalidUri(
                f"{sanitize_uri(uri)}: S3 addresses take no query string or fragment"
            )
        bucket, _, key = rest.partition("/")
        _validate_bucket(bucket, uri)
        if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
            raise InvalidUri(f"{sanitize_uri(uri)[:80]}...: S3 key longer than {_MAX_KEY_BYTES} bytes")
        return ParsedUri(scheme="s3", bucket=bucket, key=key)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(uri)
        if parsed.netloc not in ("", "localhost"):
            raise UnsupportedUri(
                f"{sanitize_uri(uri)}: file URI names host {_without_userinfo(parsed.netloc)!r}; "
                "only local files (file:///path) are supported"
            )
        if parsed.query or parsed.fragment:
            raise InvalidUri(f"{sanitize_uri(uri)}: file URIs take no query string or fragment")
        path = urllib.parse.unquote(parsed.path)
        if not path.startswith("/"):
            raise InvalidUri(f"{sanitize_uri(uri)}: file URI must hold an absolute path")
        return ParsedUri(scheme="file", path=Path(path), file_uri=True)
    raise UnsupportedUri(
        f"unsupported storage scheme {scheme!r} in {sanitize_uri(uri)} "
        "(use s3://bucket/key, file:///path or a local path)"
    )


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True when ``uri`` is a valid ``s3://`` address. Never raises."""
    try:
        return parse_uri(uri).scheme == "s3"
    except (InvalidUri, TypeError):
        return False


def is_local(uri: str | os.PathLike[str]) -> bool:
    """True when ``uri`` is a local path or ``file://`` URI. Never raises."""
    try:
        return parse_uri(uri).scheme == "file"
    except (InvalidUri, TypeError):
        return False


def _object(uri: str | os.PathLike[str]) -> ParsedUri:
    """Parse an address that must name one object (non-empty key, not a 'directory')."""
    p = parse_uri(uri)
    if p.scheme == "s3":
        if not p.key:
            raise InvalidUri(f"{sanitize_uri(str(uri))}: names a bucket, not an object (the key is empty)")
        if p.key.endswith("/"):
            raise InvalidUri(f"{sanitize_uri(str(uri))}: ends with '/', so names a prefix, not an object")
    else:
        assert p.path is not None
        if str(uri).endswith(("/", os.sep)):
            raise InvalidUri(f"{sanitize_uri(str(uri))}: ends with '/', so names a directory, not a file")
    return p


def join(base_uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto an address, for S3 and local alike.

    Slashes at the joints are collapsed (never ``//``), empty parts are
    skipped, and a part never resets the address to the root (a leading ``/``
    on a part is ignored). ``.`` and ``..`` segments are refused, so an id from
    a manifest cannot climb out of the output prefix.

    >>> join("s3://bucket/out/", "/run1", "item.png")
    's3://bucket/out/run1/item.png'
    >>> join("/data/out", "run1/", "item.png")
    '/data/out/run1/item.png'
    """
    base = os.fspath(base_uri)
    p = parse_uri(base)
    segments: list[str] = []
    for part in parts:
        for seg in str(part).split("/"):
            if seg in ("", "."):
                if seg == ".":
                    raise InvalidUri(f"join: part {part!r} contains a '.' segment")
                continue
            if seg == "..":
                raise InvalidUri(f"join: part {part!r} contains a '..' segment")
            segments.append(seg)
    tail = "/".join(segments)
    if p.scheme == "s3":
        key = (p.key or "").rstrip("/")
        key = f"{key}/{tail}" if key and tail else (key or tail)
        if not tail and (p.key or "").endswith("/"):
            key += "/"
        return ParsedUri(scheme="s3", bucket=p.bucket, key=key).uri
    if p.file_uri:
        assert p.path is not None
        path = str(p.path).rstrip("/") or "/"
        joined = path if not tail else (path.rstrip("/") + "/" + tail)
        return _path_to_file_uri(joined)
    if not tail:
        return base
    return base.rstrip("/") + "/" + tail if base.rstrip("/") else "/" + tail


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- S3 client

_client_lock = threading.Lock()
_clients: dict[int, Any] = {}  # pid -> boto3 S3 client (clients are not fork-safe)


def reset_clients() -> None:
    """Forget the cached S3 client, so the next call reads the environment again."""
    with _client_lock:
        _clients.clear()


def _is_aws_endpoint(endpoint_url: str | None) -> bool:
    if not endpoint_url:
        return True
    host = (urllib.parse.urlsplit(endpoint_url).hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


S3_POOL_CONNECTIONS = 32
"""Connections the process's one S3 client keeps open. Its threads (8 task threads, each resolving
with 8 more, the report's writers) outnumber botocore's default of 10: it then opened and dropped a
connection per request beyond the tenth, with a "Connection pool is full" warning each time."""


def _s3_client() -> Any:
    pid = os.getpid()
    client = _clients.get(pid)
    if client is not None:
        return client
    with _client_lock:
        client = _clients.get(pid)
        if client is None:
            client = _make_client()
            _clients.clear()  # a fork's inherited entry is of no use here
            _clients[pid] = client
    return client


def _make_client() -> Any:
    import boto3
    import botocore.session
    from botocore.config import Config

    try:
        core = botocore.session.Session()
        session = boto3.session.Session(botocore_session=core)
        region = session.region_name or _DEFAULT_REGION
        retry_mode_set = bool(os.environ.get("AWS_RETRY_MODE")) or bool(
            core.get_scoped_config().get("retry_mode")
        )
        kwargs: dict[str, Any] = {"max_pool_connections": S3_POOL_CONNECTIONS}
        if not retry_mode_set:
            kwargs["retries"] = {"mode": _DEFAULT_RETRY_MODE}
        client = session.client("s3", region_name=region, config=Config(**kwargs))
        if not _is_aws_endpoint(client.meta.endpoint_url):
            # A configured endpoint (SeaweedFS, MinIO): bucket in the path, not the host name.
            client = session.client(
                "s3", region_name=region, config=Config(s3={"addressing_style": "path"}, **kwargs)
            )
    except Exception as exc:  # bad profile, bad endpoint URL...
        err = StorageError("s3://", f"cannot configure the S3 client: {type(exc).__name__}: {_sanitize_text(str(exc))}")
    else:
        return client
    raise err


def _endpoint_hint() -> str:
    client = _clients.get(os.getpid())
    url = getattr(getattr(client, "meta", None), "endpoint_url", None)
    return f" at {sanitize_uri(url)}" if url else ""


# Error codes of S3 (and compatible servers) and what they mean here.
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
    "MissingSecurityHeader",
    "RequestTimeTooSkewed",
}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequests",
    "ConditionalRequestConflict",  # concurrent conditional writes: AWS says retry
    "OperationAborted",
    "500",
    "502",
    "503",
    "504",
}


def _client_error_info(exc: Any) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError."""
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    error: dict[str, Any] = response.get("Error") or {}
    meta: dict[str, Any] = response.get("ResponseMetadata") or {}
    return str(error.get("Code") or ""), int(meta.get("HTTPStatusCode") or 0)


def _translate(exc: BaseException, uri: str, bucket: str | None = None) -> StorageError:
    """Turn a boto3/botocore exception into a StorageError that carries no secrets."""
    from botocore import exceptions as bex

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bex.ClientError):
        code, status = _client_error_info(exc)
        error: Any = exc.response.get("Error") or {}
        what = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
        if code == "NoSuchBucket":
            return NoSuchBucket(uri, f"bucket {bucket!r} does not exist{_endpoint_hint()}")
        if code in _CREDENTIAL_CODES:
            return AccessDenied(
                uri,
                f"credentials refused by the S3 endpoint{_endpoint_hint()} ({code}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS profile",
            )
        if code in _DENIED_CODES or status == 403:
            return AccessDenied(
                uri,
                f"access denied by the S3 endpoint{_endpoint_hint()} ({what}); "
                "the credentials may be wrong or lack permission",
            )
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(uri, "object not found")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStorageError(uri, f"S3 endpoint{_endpoint_hint()} failed, try again later ({what})")
        message = _sanitize_text(str(error.get("Message") or ""))
        detail = f": {message}" if message else ""
        return StorageError(uri, f"S3 request failed ({what}){detail}")
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return AccessDenied(
            uri,
            "no usable AWS credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)",
        )
    transient_types: tuple[type[BaseException], ...] = (
        bex.EndpointConnectionError,
        bex.ConnectionClosedError,
        bex.ConnectTimeoutError,
        bex.ReadTimeoutError,
        bex.ConnectionError,
        bex.HTTPClientError,
        bex.IncompleteReadError,
        getattr(bex, "ResponseStreamingError", bex.HTTPClientError),
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, transient_types):
        return TransientStorageError(
            uri, f"cannot reach the S3 endpoint{_endpoint_hint()} ({type(exc).__name__}); try again later"
        )
    if isinstance(exc, bex.BotoCoreError):
        return StorageError(uri, f"S3 client error ({type(exc).__name__})")
    return StorageError(uri, f"unexpected error ({type(exc).__name__})")


def _os_error(exc: OSError, uri: str) -> StorageError:
    """Translate a local filesystem error."""
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFound(uri, "file not found")
    if isinstance(exc, PermissionError):
        return AccessDenied(uri, f"permission denied ({name})")
    if isinstance(exc, IsADirectoryError):
        return StorageError(uri, "is a directory, not a file")
    if isinstance(exc, NotADirectoryError):
        return StorageError(uri, "a parent of this path is a file, not a directory")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NoSpace(uri, f"no space left ({name}: {exc.strerror or exc})")
    transient = exc.errno in (errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.EBUSY, errno.ESTALE)
    return StorageError(uri, f"filesystem error ({name}: {exc.strerror or exc})", transient=transient)


def retry_transient(
    operation: Callable[[], T], patience_s: float, first_delay_s: float = 0.5, max_delay_s: float = 10.0
) -> T:
    """Call ``operation`` until it succeeds, retrying transient :class:`StorageError` for up to ``patience_s``.

    The delay doubles from ``first_delay_s`` up to ``max_delay_s``; a
    non-transient error, or a transient one once ``patience_s`` has passed,
    is raised. For writes that must outlast a storage blip (a run's results),
    on top of the few quick retries the S3 client itself makes.
    """
    deadline = time.monotonic() + patience_s
    delay = first_delay_s
    while True:
        try:
            return operation()
        except StorageError as exc:
            if not exc.transient or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, max_delay_s)


# --------------------------------------------------------------------------- operations


def read_bytes(uri: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """Return the whole content of an object or local file.

    ``max_bytes``: refuse an object larger than this before reading its bytes
    (:class:`ObjectTooLarge`), so a mistaken multi-gigabyte object cannot fill memory.

    Raises:
        ObjectNotFound, NoSuchBucket, AccessDenied, ObjectTooLarge, TransientStorageError, StorageError.
    """
    p = _object(uri)
    text = p.uri
    err: StorageError | None
    if p.scheme == "file":
        assert p.path is not None
        try:
            if (err := _too_large(text, p.path.stat().st_size, max_bytes)) is None:
                return p.path.read_bytes()
        except OSError as exc:
            err = _os_error(exc, text)
        raise err
    try:
        resp = _s3_client().get_object(Bucket=p.bucket, Key=p.key)
        if (err := _too_large(text, int(resp.get("ContentLength") or 0), max_bytes)) is None:
            data: bytes = resp["Body"].read()
            return data
        resp["Body"].close()
    except Exception as exc:
        err = _translate(exc, text, p.bucket)
    raise err  # outside the except: the error carries no botocore context


@dataclass(frozen=True)
class ObjectStat:
    """What names one version of an object without reading it: its size and a version tag.

    ``version`` is the S3 ``VersionId`` when the bucket keeps versions, else its ``ETag`` (which
    changes whenever the bytes do); for a local file its modification time in nanoseconds and inode
    (a rewrite or a replacement changes one of them, unless someone restores the time by hand).
    """

    size: int
    version: str


def stat(uri: str | os.PathLike[str]) -> ObjectStat:
    """The object's size and version tag (a HEAD request; ``os.stat`` for a local file).

    Raises:
        ObjectNotFound, NoSuchBucket, AccessDenied, TransientStorageError, StorageError.
    """
    p = _object(uri)
    text = p.uri
    if p.scheme == "file":
        assert p.path is not None
        try:
            st = p.path.stat()
        except OSError as exc:
            err = _os_error(exc, text)
        else:
            if not p.path.is_file():
                raise StorageError(text, "is not a regular file")
            return ObjectStat(st.st_size, f"mtime_ns={st.st_mtime_ns};ino={st.st_ino}")
        raise err
    head, found = _head_or_error(_s3_client(), p, text)
    if found is not None:
        raise found
    version_id = str(head.get("VersionId") or "null")  # "null": the bucket keeps no versions of it
    version = f"version_id={version_id}" if version_id != "null" else f"etag={head.get('ETag') or ''}"
    return ObjectStat(int(head.get("ContentLength") or 0), version)


def sha256_stream(
    uri: str | os.PathLike[str],
    max_bytes: int | None = None,
    head_bytes: int = 1 << 20,
    chunk_bytes: int = 1 << 20,
    version: ObjectStat | None = None,
) -> tuple[str, ObjectStat, bytes]:
    """Hash an object while reading it in chunks: (sha256 hex, the version read, its first ``head_bytes``).

    Memory stays at ``head_bytes + chunk_bytes`` whatever the object's size. An S3 object is read
    with ``If-Match`` on the ETag its HEAD returned, so the hash always belongs to the version
    returned; a local file is stat'ed before and after reading and refused if it changed meanwhile.
    ``version``: what :func:`stat` just returned for ``uri``, to spare a second HEAD.

    Raises:
        ObjectTooLarge: larger than ``max_bytes`` (checked before any byte is read).
        TransientStorageError: the object changed while being read (try again), or storage is unreachable.
        ObjectNotFound, NoSuchBucket, AccessDenied, StorageError.
    """
    p = _object(uri)
    text = p.uri
    version = version or stat(uri)
    if (err := _too_large(text, version.size, max_bytes)) is not None:
        raise err
    digest, head = hashlib.sha256(), bytearray()

    def take(chunk: bytes) -> None:
        digest.update(chunk)
        if len(head) < head_bytes:
            head.extend(chunk[: head_bytes - len(head)])

    failure: StorageError | None = None
    if p.scheme == "file":
        assert p.path is not None
        try:
            with open(p.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(chunk_bytes), b""):
                    take(chunk)
        except OSError as exc:
            failure = _os_error(exc, text)
        else:
            if stat(uri) != version:
                failure = TransientStorageError(text, "file changed while being hashed; try again")
    else:
        from botocore.exceptions import ClientError

        try:
            kwargs: dict[str, Any] = {"Bucket": p.bucket, "Key": p.key}  # the version HEAD saw, and no other
            if version.version.startswith("version_id="):
                kwargs["VersionId"] = version.version.removeprefix("version_id=")
            elif version.version != "etag=":
                kwargs["IfMatch"] = version.version.removeprefix("etag=")
            body = _s3_client().get_object(**kwargs)["Body"]
            for chunk in iter(lambda: body.read(chunk_bytes), b""):
                take(chunk)
        except ClientError as exc:
            _code, status = _client_error_info(exc)
            failure = TransientStorageError(text, "object changed while being hashed; try again") if status == 412 else _translate(exc, text, p.bucket)
        except Exception as exc:
            failure = _translate(exc, text, p.bucket)
    if failure is not None:
        raise failure  # outside the except: the error carries no botocore context
    return digest.hexdigest(), version, bytes(head)


def _require_bytes(function: str, data: object) -> None:
    """A write takes bytes (a str would be written in some encoding nobody chose)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{function} needs bytes, not {type(data).__name__}")


def check_size(uri: str | os.PathLike[str], size: int, max_bytes: int | None) -> None:
    """Raise :class:`ObjectTooLarge` when ``size`` (as :func:`stat` gave it) exceeds ``max_bytes``."""
    if (err := _too_large(_object(uri).uri, size, max_bytes)) is not None:
        raise err


def _too_large(uri: str, size: int, max_bytes: int | None) -> ObjectTooLarge | None:
    if max_bytes is not None and size > max_bytes:
        return ObjectTooLarge(uri, f"{size:,} bytes, more than the {max_bytes:,}-byte limit for this input")
    return None


def _content_type(key: str, content_type: str | None) -> str:
    if content_type:
        return content_type
    guessed, _ = mimetypes.guess_type(key)
    return guessed or "application/octet-stream"


def _tmp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")


def _write_tmp(target: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``target`` (fsynced); return its path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(uri: str | os.PathLike[str], data: bytes, content_type: str | None = None) -> None:
    """Write ``data`` to an object or local file, replacing what was there.

    The write is whole or absent: readers see the old content or the new, never
    a part. Local parent directories are created. ``content_type`` is stored as
    the S3 object's Content-Type (guessed from the name when None) and ignored
    for local files.
    """
    _require_bytes("write_bytes", data)
    p = _object(uri)
    text = p.uri
    if p.scheme == "file":
        assert p.path is not None
        try:
            _replace_file(p.path, bytes(data))
            _fsync_dir(p.path.parent)
            return
        except OSError as exc:
            err = _os_error(exc, text)
        raise err
    assert p.key is not None
    try:
        _s3_client().put_object(
            Bucket=p.bucket, Key=p.key, Body=bytes(data), ContentType=_content_type(p.key, content_type)
        )
        return
    except Exception as exc:
        err = _translate(exc, text, p.bucket)
    raise err


def reserve_space(uri: str | os.PathLike[str], size: int) -> None:
    """Hold at least ``size`` bytes of a local file system in the file ``uri`` (allocated, not sparse).

    The file grows to ``size`` (it never shrinks); deleting it gives the space back. So a writer can keep
    room for what it must write last (a run's results table) while other writes fill the disk. An S3
    address holds nothing (a bucket does not fill up).

    Raises:
        NoSpace: the file system has no room for ``size`` bytes (what was allocated stays held).
        StorageError: the file cannot be created (a parent is a file, permission denied...).
    """
    p = _object(uri)
    if p.scheme != "file":
        return
    assert p.path is not None
    try:
        p.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            held = os.fstat(fd).st_size
            if held < size and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            elif held < size:  # macOS: no posix_fallocate; written zeros hold their blocks (a truncate would not)
                os.lseek(fd, held, os.SEEK_SET)
                for start in range(held, size, 1 << 20):
                    os.write(fd, bytes(min(1 << 20, size - start)))
        finally:
            os.close(fd)
    except OSError as exc:
        err = _os_error(exc, p.uri)
    else:
        return
    raise err


def write_bytes_if_absent(
    uri: str | os.PathLike[str], data: bytes, content_type: str | None = None
) -> bool:
    """Create an object only if nothing is there yet; return whether this call created it.

    Exactly one of several concurrent callers gets True. S3: ``PutObject``
    with ``If-None-Match: *`` (a 412 ``PreconditionFailed`` means it exists;
    the server must support conditional writes, as AWS S3 since 2024, recent
    MinIO and SeaweedFS do). Local: the data is written to a temporary file
    that is then hard-linked to the target, which fails if the target exists,
    so the file is also whole or absent. On filesystems without hard links it
    falls back to ``O_CREAT | O_EXCL`` (exclusive, but not whole-or-absent).
    """
    return create_versioned(uri, data, content_type) is not None


def _local_create_exclusive(target: Path, data: bytes) -> bool:
    tmp = _write_tmp(target, data)
    try:
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            # No hard links here: exclusive create in place instead.
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(target.parent)
        return True
    finally:
        _unlink_quietly(tmp)


# --------------------------------------------------------------------------- compare-and-swap
#
# A *version* names one state of an object: its ETag on S3, the SHA-256 of its
# bytes locally. ``read_versioned`` returns it with the bytes; ``replace_if_version``
# and ``delete_if_version`` act only while the object is still in that state, so a
# caller that read, decided and wrote can never overwrite a change it did not see.
# (Leases, nst_core/lease.py, are built on these three.)


def read_versioned(uri: str | os.PathLike[str], max_bytes: int | None = None) -> tuple[bytes, str]:
    """Return an object's bytes and its version (S3 ETag; locally the bytes' SHA-256).

    Raises:
        ObjectNotFound, NoSuchBucket, AccessDenied, ObjectTooLarge, TransientStorageError, StorageError.
    """
    p = _object(uri)
    if p.scheme == "file":
        data = read_bytes(uri, max_bytes)
        return data, sha256_bytes(data)
    text = p.uri
    err: StorageError | None
    try:
        resp = _s3_client().get_object(Bucket=p.bucket, Key=p.key)
        if (err := _too_large(text, int(resp.get("ContentLength") or 0), max_bytes)) is None:
            return resp["Body"].read(), str(resp.get("ETag") or "")
        resp["Body"].close()
    except Exception as exc:
        err = _translate(exc, text, p.bucket)
    raise err


def create_versioned(uri: str | os.PathLike[str], data: bytes, content_type: str | None = None) -> str | None:
    """Create an object only if nothing is there yet; its new version, or None when something was there.

    Same guarantees as :func:`write_bytes_if_absent` (which calls this).
    """
    _require_bytes("create_versioned", data)
    p = _object(uri)
    text = p.uri
    if p.scheme == "file":
        assert p.path is not None
        try:
            return sha256_bytes(bytes(data)) if _local_create_exclusive(p.path, bytes(data)) else None
        except OSError as exc:
            err = _os_error(exc, text)
        raise err
    return _s3_put_conditional(p, text, bytes(data), content_type, {"IfNoneMatch": "*"})


def replace_if_version(
    uri: str | os.PathLike[str], data: bytes, version: str, content_type: str | None = None
) -> str | None:
    """Replace an object with ``data`` only while it is in state ``version``; the new version, or None.

    None means the object changed since ``version`` was read, or is gone (a
    replace never re-creates a deleted object). S3: ``PutObject`` with
    ``If-Match: <ETag>`` (AWS S3, MinIO and SeaweedFS honour it atomically; a
    server that answers 501 NotImplemented gets the stated fallback: read,
    compare, write, which narrows the race to one round trip but cannot close
    it). Local: under an exclusive ``flock`` on the parent directory, the
    current bytes' hash is compared and the new bytes renamed into place.
    """
    _require_bytes("replace_if_version", data)
    p = _object(uri)
    text = p.uri
    if p.scheme == "file":
        new_version = sha256_bytes(bytes(data))
        def replace(path: Path) -> str:
            _replace_file(path, bytes(data))
            return new_version

        return _local_if_version(p, text, version, replace)
    if _conditional_fallback.is_set():
        return _s3_fallback_replace(p, text, bytes(data), version, content_type)
    return _s3_put_conditional(p, text, bytes(data), content_type, {"IfMatch": version})


def delete_if_version(uri: str | os.PathLike[str], version: str) -> bool:
    """Delete an object only while it is in state ``version``; True when this call deleted it.

    S3: ``DeleteObject`` with ``If-Match`` (same fallback as :func:`replace_if_version`).
    Local: hash compared and the file unlinked under the parent directory's ``flock``.
    """
    p = _object(uri)
    text = p.uri
    if p.scheme == "file":
        def unlink(path: Path) -> bool:
            os.unlink(path)
            return True

        return _local_if_version(p, text, version, unlink) is not None
    from botocore.exceptions import ClientError

    err: StorageError | None = None
    if not _conditional_fallback.is_set():
        try:
            _s3_client().delete_object(Bucket=p.bucket, Key=p.key, IfMatch=version)
            return True
        except ClientError as exc:
            code, status = _client_error_info(exc)
            if code == "PreconditionFailed" or status == 412 or status == 404 or code in _NOT_FOUND_CODES:
                return False
            if not _conditional_unsupported(code, status):
                err = _translate(exc, text, p.bucket)
        except Exception as exc:
            err = _translate(exc, text, p.bucket)
    if err is not None:
        raise err  # outside the except: the error carries no botocore context
    try:
        _data, current = read_versioned(uri)
    except ObjectNotFound:
        return False
    if current != version:
        return False
    delete(uri)
    return True


_conditional_fallback = threading.Event()  # set once a server answered 501 to If-Match


def _conditional_unsupported(code: str, status: int) -> bool:
    """True (and the fallback switched on, with one warning) when the server refuses If-Match as unimplemented."""
    if code != "NotImplemented" and status != 501:
        return False
    if not _conditional_fallback.is_set():
        _conditional_fallback.set()
        import logging

        logging.getLogger(__name__).warning(
            "the S3 server does not implement If-Match on writes; conditional replace and delete fall back "
            "to read-compare-write (leases are then exclusive only up to one round trip)"
        )
    return True


def _s3_put_conditional(
    p: ParsedUri, text: str, data: bytes, content_type: str | None, condition: dict[str, str]
) -> str | None:
    from botocore.exceptions import ClientError

    assert p.key is not None
    try:
        resp = _s3_client().put_object(
            Bucket=p.bucket, Key=p.key, Body=data, ContentType=_content_type(p.key, content_type), **condition
        )
        return str(resp.get("ETag") or "")
    except ClientError as exc:
        code, status = _client_error_info(exc)
        if code == "PreconditionFailed" or status == 412:
            return None
        if "IfMatch" in condition and (status == 404 or code in _NOT_FOUND_CODES):
            return None  # gone: a replace never re-creates
        if "IfMatch" in condition and _conditional_unsupported(code, status):
            fallback = True
        else:
            fallback = False
            err = _translate(exc, text, p.bucket)
    except Exception as exc:
        fallback = False
        err = _translate(exc, text, p.bucket)
    if fallback:
        return _s3_fallback_replace(p, text, data, condition["IfMatch"], content_type)
    raise err


def _s3_fallback_replace(p: ParsedUri, text: str, data: bytes, version: str, content_type: str | None) -> str | None:
    """Read, compare, write: the stated fallback for servers without If-Match (not atomic)."""
    try:
        _old, current = read_versioned(text)
    except ObjectNotFound:
        return None
    if current != version:
        return None
    write_bytes(text, data, content_type)
    try:
        return read_versioned(text)[1]
    except ObjectNotFound:
        return None


def _local_if_version(p: ParsedUri, text: str, version: str, act: Callable[[Path], T]) -> T | None:
    """``act(path)`` under the folder's ``flock`` while the file's bytes hash to ``version``; None when they do not."""
    assert p.path is not None
    if not p.path.parent.is_dir():
        return None  # no folder, so no file in the state read
    try:
        with _directory_lock(p.path.parent):
            if _local_version(p.path) != version:
                return None
            result = act(p.path)
            _fsync_dir(p.path.parent)
            return result
    except OSError as exc:
        err = _os_error(exc, text)
    raise err


def _replace_file(target: Path, data: bytes) -> None:
    """Write ``data`` beside ``target`` and rename it into place (whole or absent; no temporary file left)."""
    tmp = _write_tmp(target, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _local_version(path: Path) -> str | None:
    try:
        return sha256_bytes(path.read_bytes())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Any:
    """Hold an exclusive ``flock`` on ``directory`` (one per open, so threads of one process exclude each other too).

    Released when the process dies, so a killed worker leaves no lock behind.
    """
    import fcntl

    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def exists(uri: str | os.PathLike[str]) -> bool:
    """True when the object (or local regular file) exists.

    For S3 this is a HEAD request. A HEAD carries no error body, so a missing
    bucket also reads as False here (reads and writes report NoSuchBucket).
    On AWS, an identity without ``s3:ListBucket`` gets 403 for a missing key;
    that raises AccessDenied rather than guessing.
    """
    p = _object(uri)
    text = p.uri
    if p.scheme == "file":
        assert p.path is not None
        try:
            os.stat(p.path)
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False
        except OSError as exc:
            err = _os_error(exc, text)
        else:
            return p.path.is_file()
        raise err
    from botocore.exceptions import ClientError

    try:
        _s3_client().head_object(Bucket=p.bucket, Key=p.key)
        return True
    except ClientError as exc:
        translated = _translate(exc, text, p.bucket)
        if isinstance(translated, (ObjectNotFound, NoSuchBucket)):
            return False
        err = translated
    except Exception as exc:
        err = _translate(exc, text, p.bucket)
    raise err


def delete(uri: str | os.PathLike[str]) -> None:
    """Delete an object or local file. Deleting what is not there is not an error."""
    p = _object(uri)
    text = p.uri
    if p.scheme == "file":
        assert p.path is not None
        try:
            os.unlink(p.path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            err = _os_error(exc, text)
        raise err
    try:
        _s3_client().delete_object(Bucket=p.bucket, Key=p.key)
        return
    except Exception as exc:
        translated = _translate(exc, text, p.bucket)
        if isinstance(translated, ObjectNotFound):
            return
        err = translated
    raise err


def list_prefix(uri_prefix: str | os.PathLike[str]) -> list[str]:
    """Full addresses of all objects under a prefix, recursively, sorted.

    The prefix is a plain string prefix, as S3 means it: ``s3://b/out/item``
    matches ``out/item1/x`` and ``out/item.png``; end it with ``/`` to mean a
    directory. ``s3://bucket`` lists the whole bucket (paginated, so any size).
    Local prefixes follow the same rule and return paths in the caller's style
    (plain paths or ``file://`` URIs); a prefix under a missing directory lists
    nothing, and temporary files of unfinished writes are never listed. S3
    "folder" marker keys (ending in ``/``) are not objects and are skipped.

    Raises:
        NoSuchBucket, AccessDenied, TransientStorageError, StorageError.
    """
    p = parse_uri(uri_prefix)
    text = p.uri
    if p.scheme == "file":
        try:
            return _list_local(p, os.fspath(uri_prefix))
        except OSError as exc:
            err = _os_error(exc, text)
        raise err
    results: list[str] = []
    try:
        paginator = _s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(
            Bucket=p.bucket, Prefix=p.key or "", PaginationConfig={"PageSize": _LIST_PAGE_SIZE}
        ):
            for obj in page.get("Contents", []) or []:
                if not obj["Key"].endswith("/"):  # "folder" markers are not objects
                    results.append(f"s3://{p.bucket}/{obj['Key']}")
    except Exception as exc:
        err = _translate(exc, text, p.bucket)
    else:
        return sorted(results)
    raise err


def _list_local(p: ParsedUri, original: str) -> list[str]:
    assert p.path is not None
    raw = str(p.path) if p.file_uri else os.path.expanduser(original)
    if raw.endswith("/") or raw.endswith(os.sep):
        parent, stem = raw, ""
    else:
        parent, stem = os.path.split(raw)
    parent_dir = parent or "."
    found: list[str] = []

    def render(path: str) -> str:
        if p.file_uri:
            return _path_to_file_uri(os.path.abspath(path))
        return path

    def keep(name: str) -> bool:
        return not name.endswith(_TMP_SUFFIX)

    try:
        entries = list(os.scandir(parent_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if not entry.name.startswith(stem):
            continue
        full = os.path.join(parent, entry.name) if parent else entry.name
        if entry.is_file():
            if keep(entry.name):
                found.append(render(full))
        elif entry.is_dir():
            for root, _dirs, files in os.walk(full):
                for name in files:
                    if keep(name):
                        found.append(render(os.path.join(root, name)))
    return sorted(found)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$NST_CACHE_DIR`` if set, else ``~/.cache/nst/objects``."""
    env = os.environ.get("NST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nst" / "objects"


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def fetch_to_cache(uri: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """Return a local path holding the object's bytes.

    Local addresses come back as a ``Path`` unchanged, once checked to exist
    (else ObjectNotFound). ``s3://`` objects are downloaded into ``cache_dir``
    (default :func:`default_cache_dir`) under ``<hash>-<basename>``, written
    atomically. The hash covers the URI and the object's ETag, so a changed
    object is fetched again rather than served stale; an unchanged one costs a
    HEAD request and no download.
    """
    p = _object(uri)
    text = p.uri
    if p.scheme == "file":
        assert p.path is not None
        if not p.path.is_file():
            if p.path.exists():
                raise StorageError(text, "is not a regular file")
            raise ObjectNotFound(text, "file not found")
        return p.path
    assert p.key is not None
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    client = _s3_client()
    head, err = _head_or_error(client, p, text)
    if err is not None:
        raise err
    etag = str(head.get("ETag") or "")
    size = int(head.get("ContentLength") or 0)
    digest = hashlib.sha256(f"{text}\0{etag}".encode()).hexdigest()[:24]
    basename = _SAFE_NAME.sub("_", p.key.rsplit("/", 1)[-1])[:100] or "object"
    target = directory / f"{digest}-{basename}"
    try:
        if target.is_file() and target.stat().st_size == size:
            return target
    except OSError:
        pass
    data, err = _get_if_match(client, p, text, etag)
    if err is not None:
        raise err
    assert data is not None
    try:
        _replace_file(target, data)
    except OSError as exc:
        err = _os_error(exc, str(target))
    else:
        return target
    raise err


def _head_or_error(client: Any, p: ParsedUri, text: str) -> tuple[dict[str, Any], StorageError | None]:
    """HEAD an object; on failure return a translated error (never raised inside ``except``)."""
    try:
        return client.head_object(Bucket=p.bucket, Key=p.key), None
    except Exception as exc:
        err = _translate(exc, text, p.bucket)
    if isinstance(err, ObjectNotFound):
        # HEAD cannot tell a missing bucket from a missing key; GET can.
        try:
            client.get_object(Bucket=p.bucket, Key=p.key)
        except Exception as exc:
            err = _translate(exc, text, p.bucket)
    return {}, err


def _get_if_match(client: Any, p: ParsedUri, text: str, etag: str) -> tuple[bytes | None, StorageError | None]:
    """GET an object's bytes, insisting on ``etag`` when given."""
    from botocore.exceptions import ClientError

    kwargs: dict[str, Any] = {"Bucket": p.bucket, "Key": p.key}
    if etag:
        kwargs["IfMatch"] = etag
    try:
        return client.get_object(**kwargs)["Body"].read(), None
    except ClientError as exc:
        _code, status = _client_error_info(exc)
        err: StorageError
        if status == 412:
            err = TransientStorageError(text, "object changed while being fetched; try again")
        else:
            err = _translate(exc, text, p.bucket)
    except Exception as exc:
        err = _translate(exc, text, p.bucket)
    return None, err
