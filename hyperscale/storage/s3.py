"""S3 (and S3-compatible stores) for shards, model exports and run outputs: boto3, no Ray.

URLs are ``s3://bucket/key``. The client comes from the standard AWS chain
(environment, profile, instance role); ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
point it at any S3-compatible store (MinIO, Ceph, moto) and ``AWS_DEFAULT_REGION`` /
``AWS_REGION`` set the region. botocore's own retries are switched off so that one
policy (``Retry``: exponential backoff on connection errors, 5xx and throttling; from
``HYPERSCALE_S3_ATTEMPTS`` / ``HYPERSCALE_S3_BACKOFF_S``) governs every call, and a
reader whose connection drops mid-object resumes with a ``Range`` GET pinned to the
object's ETag. When the attempts are spent, ``S3UnavailableError`` names the URL.

Permanent errors become the usual exception types with a message that says what is
wrong: ``FileNotFoundError`` (missing bucket or key), ``S3AccessError`` (a
``PermissionError``: no credentials, access denied), ``ValueError`` (a bad URL).
"""
from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar

import boto3
import boto3.exceptions
import botocore.exceptions as bce
from botocore.config import Config as BotoConfig
from urllib3.exceptions import HTTPError as Urllib3Error

log = logging.getLogger(__name__)

T = TypeVar("T")
CACHE_ENV = "HYPERSCALE_CACHE_DIR"  # the same cache root as the eval feature cache
ATTEMPTS_ENV, BACKOFF_ENV = "HYPERSCALE_S3_ATTEMPTS", "HYPERSCALE_S3_BACKOFF_S"

# Error codes S3 and compatible stores use for "slow down" and "try again".
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                    "TooManyRequests", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
                    "ServiceUnavailable", "503", "500", "502", "504"}
# Exceptions raised by a dropped, refused or timed-out connection (before or mid-body).
_TRANSIENT_EXC = (bce.ConnectionError, bce.HTTPClientError, bce.ResponseStreamingError,
                  bce.IncompleteReadError, Urllib3Error, http.client.HTTPException,
                  ConnectionError, TimeoutError)


class S3UnavailableError(ConnectionError):
    """The store could not be reached (or kept failing) for every retry attempt."""


class S3AccessError(PermissionError):
    """No credentials, or the credentials may not do this."""


# ------------------------------------------------------------------------------- URLs

def is_s3_url(url: str) -> bool:
    return str(url).startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key"); the key may be empty."""
    if not is_s3_url(url):
        raise ValueError(f"{url!r}: not an S3 URL (expected s3://bucket/key)")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or "{" in bucket or not all(c.isalnum() or c in ".-_" for c in bucket):
        raise ValueError(f"{url!r}: bad S3 URL, no valid bucket name (expected s3://bucket/key)")
    return bucket, key


def s3_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


# ----------------------------------------------------------------------- client, retry

@dataclass(frozen=True)
class Retry:
    """attempts: total tries per call (>= 1); the wait before try k (k >= 2) is
    ``base_delay * 2**(k-2)`` seconds, at most ``max_delay``, times a jitter in [0.5, 1]."""
    attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 10.0

    def __post_init__(self):
        if self.attempts < 1 or self.base_delay < 0:
            raise ValueError(f"Retry needs attempts >= 1 and base_delay >= 0, got {self}")

    @classmethod
    def from_env(cls) -> "Retry":
        try:
            return cls(int(os.environ.get(ATTEMPTS_ENV, cls.attempts)),
                       float(os.environ.get(BACKOFF_ENV, cls.base_delay)))
        except ValueError as exn:
            raise ValueError(f"{ATTEMPTS_ENV} / {BACKOFF_ENV}: {exn}") from None

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try ``attempt`` (1-based)."""
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def client():
    """A boto3 S3 client from the standard credential chain; one per process and setting
    (clients are thread-safe but must not cross a fork)."""
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
    key = (os.getpid(), endpoint_url(), region, os.environ.get("AWS_PROFILE"),
           os.environ.get("AWS_ACCESS_KEY_ID"))
    with _clients_lock:
        if key not in _clients:
            config = BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"},
                                connect_timeout=10, read_timeout=60, max_pool_connections=32)
            session = boto3.session.Session()
            _clients[key] = session.client("s3", endpoint_url=key[1], region_name=region,
                                           config=config)
        return _clients[key]


def _error_code(exn: bce.ClientError) -> tuple[str, int]:
    return (str(exn.response.get("Error", {}).get("Code", "")),
            int(exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0))


def _root_cause(exn: BaseException) -> BaseException:
    """boto3's transfer manager wraps the real error (S3UploadFailedError, RetriesExceededError)."""
    while isinstance(exn, (boto3.exceptions.S3UploadFailedError, boto3.exceptions.RetriesExceededError)):
        inner = getattr(exn, "last_exception", None) or exn.__cause__ or exn.__context__
        if inner is None:
            break
        exn = inner
    return exn


def is_transient(exn: BaseException) -> bool:
    """Worth retrying: a connection problem, a 5xx or a throttling answer."""
    exn = _root_cause(exn)
    if isinstance(exn, bce.ClientError):
        code, status = _error_code(exn)
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return isinstance(exn, _TRANSIENT_EXC)


def _permanent(exn: BaseException, url: str) -> BaseException:
    """A non-retryable botocore error -> an exception whose message says what is wrong."""
    exn = _root_cause(exn)
    if isinstance(exn, bce.NoCredentialsError):
        return S3AccessError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role")
    if isinstance(exn, bce.ClientError):
        code, status = _error_code(exn)
        bucket = parse_s3_url(url)[0]
        if code == "NoSuchBucket":
            return FileNotFoundError(f"{url}: bucket '{bucket}' does not exist"
                                     f" (endpoint {endpoint_url() or 'AWS'})")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return FileNotFoundError(f"{url}: no such object")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "AllAccessDisabled") or status == 403:
            return S3AccessError(f"{url}: access denied ({code}); check the credentials and "
                                 f"their permissions on bucket '{bucket}'")
        if code == "PreconditionFailed":
            return OSError(f"{url}: the object changed while it was being read")
    return exn


def call(fn: Callable[[], T], url: str, retry: Retry | None = None) -> T:
    """``fn()`` with retries on transient errors; permanent ones are translated at once."""
    retry = retry or Retry.from_env()
    for attempt in range(1, retry.attempts + 1):
        try:
            return fn()
        except Exception as exn:  # noqa: BLE001 - classified below
            if not is_transient(exn):
                translated = _permanent(exn, url)
                if translated is exn:
                    raise
                raise translated from exn
            if attempt == retry.attempts:
                raise S3UnavailableError(f"{url}: S3 request failed {retry.attempts} times "
                                         f"(endpoint {endpoint_url() or 'AWS'}); last error: "
                                         f"{type(exn).__name__}: {exn}") from exn
            wait = retry.delay(attempt)
            log.warning("%s: %s (try %d/%d), retrying in %.2f s", url, type(exn).__name__,
                        attempt, retry.attempts, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- reading

class _ObjectReader(io.RawIOBase):
    """One object's body as a raw binary stream. A connection that drops mid-body is
    reopened at the current byte with ``Range`` and ``If-Match`` (the same version)."""

    def __init__(self, url: str, retry: Retry, s3=None):
        self.url, self.retry, self.s3 = url, retry, s3 or client()
        self.bucket, self.key = parse_s3_url(url)
        self.pos, self.etag, self.size = 0, None, None
        self._body = None
        self._open()

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kwargs |= {"Range": f"bytes={self.pos}-", "IfMatch": self.etag}
        resp = call(lambda: self.s3.get_object(**kwargs), self.url, self.retry)
        if self.etag is None:
            self.etag, self.size = resp.get("ETag"), resp.get("ContentLength")
        self._body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.size is not None and self.pos >= self.size or not len(view):
            return 0
        for attempt in range(1, self.retry.attempts + 1):
            try:
                if self._body is None:
                    self._open()
                data = self._body.read(len(view))
                if not data and self.size is not None and self.pos < self.size:
                    raise bce.IncompleteReadError(actual_bytes=self.pos, expected_bytes=self.size)
                view[:len(data)] = data
                self.pos += len(data)
                return len(data)
            except Exception as exn:  # noqa: BLE001 - classified below
                if isinstance(exn, S3UnavailableError) or not is_transient(exn):
                    raise  # (a reopen has already spent its own retries)
                self._drop_body()
                if attempt == self.retry.attempts:
                    raise S3UnavailableError(f"{self.url}: reading failed {attempt} times at byte "
                                             f"{self.pos}; last error: {type(exn).__name__}: {exn}"
                                             ) from exn
                wait = self.retry.delay(attempt)
                log.warning("%s: connection lost at byte %d (%s), resuming in %.2f s",
                            self.url, self.pos, type(exn).__name__, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - a dead connection may fail to close
                pass
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()

    def __repr__(self) -> str:
        return f"<S3 object {self.url}>"


def open_object(url: str, retry: Retry | None = None, buffer_size: int = 1 << 20,
                s3=None) -> BinaryIO:
    """Stream an object as a buffered binary file (sequential reads; nothing is spooled
    to disk). Raises FileNotFoundError / S3AccessError / S3UnavailableError."""
    return io.BufferedReader(_ObjectReader(url, retry or Retry.from_env(), s3), buffer_size)


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    size: int   # bytes
    etag: str


def list_objects(url: str, retry: Retry | None = None) -> list[ObjectInfo]:
    """Every object whose key starts with the URL's key (a plain prefix, not a glob)."""
    bucket, prefix = parse_s3_url(url)
    s3, out, token = client(), [], None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix} | ({"ContinuationToken": token} if token else {})
        page = call(lambda: s3.list_objects_v2(**kwargs), url, retry)
        out += [ObjectInfo(s3_url(bucket, o["Key"]), int(o["Size"]), o.get("ETag", ""))
                for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def missing_objects(urls: list[str], retry: Retry | None = None) -> list[str]:
    """The URLs that name no object; one listing per distinct directory, not one request
    per URL. Raises FileNotFoundError for a missing bucket."""
    present: set[str] = set()
    for directory in sorted({u.rsplit("/", 1)[0] + "/" for u in urls}):
        present.update(o.url for o in list_objects(directory, retry))
    return [u for u in urls if u not in present]


# ------------------------------------------------------------------------- directories

def _dir_prefix(url: str) -> tuple[str, str]:
    bucket, key = parse_s3_url(url)
    return bucket, (key.rstrip("/") + "/") if key.strip("/") else ""


def upload_file(path: str | os.PathLike, url: str, retry: Retry | None = None) -> None:
    bucket, key = parse_s3_url(url)
    if not key or key.endswith("/"):
        raise ValueError(f"{url}: an object URL needs a key (s3://bucket/key)")
    s3 = client()
    call(lambda: s3.upload_file(os.fspath(path), bucket, key), url, retry)


def upload_dir(directory: str | os.PathLike, url: str, retry: Retry | None = None) -> list[str]:
    """Upload every file under ``directory`` to ``url/<relative path>``; returns the URLs."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    bucket, prefix = _dir_prefix(url)
    urls = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        urls.append(s3_url(bucket, prefix + path.relative_to(root).as_posix()))
        upload_file(path, urls[-1], retry)
    return urls


def download_dir(url: str, directory: str | os.PathLike, retry: Retry | None = None,
                 objects: list[ObjectInfo] | None = None) -> Path:
    """Download everything under the prefix ``url`` into ``directory``, atomically: the
    files land in a temp dir beside it that is renamed into place. If ``directory``
    already exists (another process finished first) it is kept, never replaced, so
    readers of a finished download are never disturbed."""
    bucket, prefix = _dir_prefix(url)
    objects = list_objects(s3_url(bucket, prefix), retry) if objects is None else objects
    if not objects:
        raise FileNotFoundError(f"{url}: no objects under this prefix")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        s3 = client()
        for obj in objects:
            rel = parse_s3_url(obj.url)[1][len(prefix):]
            if (not rel or rel.endswith("/")) and not obj.size:
                continue  # a "directory" marker object (pyarrow, consoles), the prefix's own included
            dest = (tmp / rel).resolve()
            if not rel or tmp.resolve() not in dest.parents:
                raise ValueError(f"{obj.url}: key does not map to a file under the prefix")
            dest.parent.mkdir(parents=True, exist_ok=True)
            call(lambda: s3.download_file(bucket, parse_s3_url(obj.url)[1], str(dest)), obj.url, retry)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else's complete copy won
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def cached_download(url: str, cache_dir: str | os.PathLike | None = None,
                    retry: Retry | None = None) -> Path:
    """A local copy of the directory at ``url`` in the cache, keyed by the listing (keys,
    sizes, ETags): an unchanged prefix costs one LIST, a changed one downloads anew.

    Cache: ``cache_dir`` or $HYPERSCALE_CACHE_DIR or ~/.cache/hyperscale, under ``s3/``.
    """
    bucket, prefix = _dir_prefix(url)
    objects = list_objects(s3_url(bucket, prefix), retry)
    if not objects:
        raise FileNotFoundError(f"{url}: no objects under this prefix "
                                f"(endpoint {endpoint_url() or 'AWS'})")
    digest = hashlib.sha256("\n".join(f"{o.url} {o.size} {o.etag}" for o in objects)
                            .encode()).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hyperscale")
    target = root / "s3" / bucket / prefix.strip("/") / digest
    if target.is_dir():
        return target
    log.info("downloading %s (%d objects) to %s", url, len(objects), target)
    return download_dir(url, target, retry, objects)


# -------------------------------------------------------------------- writing outputs

def put_text(url: str, text: str, retry: Retry | None = None) -> None:
    """One small object (config, metrics); a PUT replaces an object whole."""
    bucket, key = parse_s3_url(url)
    if not key or key.endswith("/"):
        raise ValueError(f"{url}: an object URL needs a key (s3://bucket/key)")
    s3 = client()
    call(lambda: s3.put_object(Bucket=bucket, Key=key, Body=text.encode()), url, retry)


def read_bytes(url: str, retry: Retry | None = None) -> bytes:
    """One whole object (a prompt file, a config); streamed with retries and resume."""
    with open_object(url, retry) as f:
        return f.read()


def read_text(url: str, retry: Retry | None = None) -> str:
    return read_bytes(url, retry).decode()


def delete_objects(urls: list[str], retry: Retry | None = None) -> None:
    s3 = client()
    for bucket in sorted({parse_s3_url(u)[0] for u in urls}):
        keys = [parse_s3_url(u)[1] for u in urls if parse_s3_url(u)[0] == bucket]
        for i in range(0, len(keys), 1000):  # the API's batch limit
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            call(lambda: s3.delete_objects(Bucket=bucket, Delete=batch), s3_url(bucket, keys[i]), retry)


def publish_dir(directory: str | os.PathLike, url: str, last: tuple[str, ...] = (),
                retry: Retry | None = None) -> list[str]:
    """Upload ``directory`` under the prefix ``url`` so that readers never take a partial
    upload for a finished one: in every directory that holds a file named in ``last`` (its
    "done" marker, e.g. an export's metadata), the other files go up first, then the objects
    this upload did not write are deleted (the directory is replaced, as a local rename
    would), then the marker. Returns the uploaded URLs."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    bucket, prefix = _dir_prefix(url)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    key = {p: prefix + p.relative_to(root).as_posix() for p in files}
    markers = [p for p in files if p.name in last]
    for p in files:
        if p not in markers:
            upload_file(p, s3_url(bucket, key[p]), retry)
    written = set(key.values())
    for d in sorted({p.parent for p in markers}):
        sub = prefix + ("" if d == root else d.relative_to(root).as_posix() + "/")
        stale = [o.url for o in list_objects(s3_url(bucket, sub), retry)
                 if parse_s3_url(o.url)[1] not in written]
        if stale:
            delete_objects(stale, retry)
    for p in markers:
        upload_file(p, s3_url(bucket, key[p]), retry)
    return [s3_url(bucket, key[p]) for p in files]


# ------------------------------------------------------- settings for other processes

# What a process needs to reach the same store as this one, when it does not inherit this
# process's environment (the workers of a Ray cluster started earlier or elsewhere).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_EC2_METADATA_DISABLED", ATTEMPTS_ENV, BACKOFF_ENV)


def settings_env() -> dict[str, str]:
    """This process's S3 settings given as environment variables (endpoint, region,
    credentials, retry policy); profiles and instance roles are the other node's own."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def arrow_filesystem(url: str):
    """A ``pyarrow.fs.S3FileSystem`` for ``url`` (Ray Train's storage) on the store that
    ``client()`` uses: the same endpoint (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``),
    region and environment credentials. It pickles with them, so Ray's controller and
    workers reach that store whatever their own environment; without environment
    credentials each process uses its own chain (profile, instance role)."""
    import pyarrow.fs

    kwargs: dict[str, Any] = {}
    endpoint = endpoint_url()
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        kwargs |= {"endpoint_override": host if sep else endpoint, "scheme": scheme if sep else "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if not region and not endpoint:
        region = pyarrow.fs.resolve_s3_region(parse_s3_url(url)[0])  # AWS: the bucket's region
    if region:
        kwargs["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs |= {"access_key": os.environ["AWS_ACCESS_KEY_ID"],
                   "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                   "session_token": os.environ.get("AWS_SESSION_TOKEN")}
    return pyarrow.fs.S3FileSystem(**kwargs)
