"""A photo store over one S3 bucket (AWS, MinIO, or any S3-compatible endpoint).

Credentials come from boto3's standard chain (environment, shared config, instance or
task role); nothing here takes a key or secret. Photos are read from the configured
bucket by key only: a key that looks like a URL is refused, never fetched.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from storage.errors import (
    DEFAULT_MAX_OBJECT_BYTES,
    StorageConfigError,
    StorageError,
    TransientStorageError,
)
from worker.errors import ImageTooLarge, ModelNotFound, PhotoUnreadable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

logger = logging.getLogger(__name__)

"""Photos larger than this are refused before download (no camera writes such JPEGs)."""

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "InvalidObjectState"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)
# Network-level failures after botocore's own retries: the endpoint is there but did not answer.
# A photo's read retries these itself (botocore retries the request, never a body that stalls
# or breaks off) before they reach the job.
_TRANSIENT_EXCEPTIONS: tuple[type[Exception], ...] = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)


DEFAULT_READ_TIMEOUT = 30.0
"""Seconds a socket read may wait (headers or the next bytes of a body) before it fails."""
DEFAULT_READ_ATTEMPTS = 3
"""Tries of one photo's read (request and body) before its error reaches the job."""


def client_config(
    max_pool_connections: int = 16, read_timeout: float = DEFAULT_READ_TIMEOUT
) -> Config:
    """botocore settings: standard retry mode (backoff with jitter, up to 5 retries), pool size,
    and socket timeouts, so that a stalled connection fails instead of hanging a job."""
    return Config(
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=max_pool_connections,
        connect_timeout=10,
        read_timeout=read_timeout,
        tcp_keepalive=True,
    )


def make_client(
    endpoint_url: str | None = None,
    max_pool_connections: int = 16,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> S3Client:
    """An S3 client from boto3's standard credential chain.

    A new boto3 Session per client: the default session is not safe to share across threads,
    and a client must not cross a fork (each worker process makes its own).
    """
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        config=client_config(max_pool_connections, read_timeout),
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> `("bucket", "some/prefix")`."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageConfigError(f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def _error_code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, _TRANSIENT_EXCEPTIONS):
        return True
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    return False


class S3Store:
    """Photos and thumbnails in one bucket; keys are the web app's storage names."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        client: S3Client | None = None,
        max_pool_connections: int = 16,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        read_attempts: int = DEFAULT_READ_ATTEMPTS,
    ) -> None:
        if not bucket:
            raise StorageConfigError("no S3 bucket given: set AFTERTRIP_S3_BUCKET")
        self.bucket = bucket
        self.max_object_bytes = max_object_bytes
        self.read_attempts = max(1, read_attempts)
        self.client = client or make_client(endpoint_url, max_pool_connections, read_timeout)

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, endpoint_url={self.client.meta.endpoint_url!r})"

    def _check_key(self, key: str) -> None:
        if not key or "://" in key:
            raise PhotoUnreadable(
                key, f"not a key in bucket {self.bucket} (URLs are never fetched)"
            )

    def _raise(self, key: str, exc: Exception, action: str) -> NoReturn:
        """Turn a boto error into the project's error: photo, transient or configuration."""
        if _is_transient(exc):
            raise TransientStorageError(
                key, f"{action} in s3://{self.bucket} failed: {exc}"
            ) from exc
        if isinstance(exc, NoCredentialsError):
            raise StorageConfigError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "a profile, or an instance/task role"
            ) from exc
        if isinstance(exc, ClientError):
            code, _status = _error_code(exc)
            if code == "NoSuchBucket":
                raise StorageConfigError(
                    f"bucket {self.bucket} does not exist: check AFTERTRIP_S3_BUCKET"
                ) from exc
        raise StorageError(f"{action} s3://{self.bucket}/{key} failed: {exc}") from exc

    def read(self, key: str) -> bytes:
        """The object's bytes.

        Missing or forbidden -> `PhotoUnreadable`; over `max_object_bytes` -> `ImageTooLarge`;
        throttled, 5xx or network trouble (after botocore's retries) -> `TransientStorageError`.
        A body that stalls (no byte for the read timeout) or breaks off is read again, up to
        `read_attempts` times with a short backoff, before its error reaches the job: one
        photo's broken connection costs that photo's read, not the job's.
        """
        self._check_key(key)
        for attempt in range(1, self.read_attempts + 1):
            try:
                return self._read_once(key)
            except _TRANSIENT_EXCEPTIONS as exc:
                if attempt == self.read_attempts:
                    self._raise(key, exc, f"reading ({attempt} tries)")
                pause = min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
                logger.warning(
                    "S3 read of s3://%s/%s failed (%s), try %d of %d in %.1f s",
                    self.bucket,
                    key,
                    type(exc).__name__,
                    attempt + 1,
                    self.read_attempts,
                    pause,
                    extra={"s3_key": key, "attempt": attempt},
                )
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _read_once(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            size = int(response.get("ContentLength", 0) or 0)
            if size > self.max_object_bytes:
                response["Body"].close()
                raise ImageTooLarge(
                    key, f"object is {size} bytes, over the {self.max_object_bytes} byte limit"
                )
            return bytes(response["Body"].read())
        except _TRANSIENT_EXCEPTIONS:
            raise
        except ClientError as exc:
            code, status = _error_code(exc)
            if code == "NoSuchBucket":
                self._raise(key, exc, "reading")
            if code in _MISSING_CODES or status == 404:
                raise PhotoUnreadable(key, f"no such object in bucket {self.bucket}") from exc
            if code in _DENIED_CODES or status == 403:
                raise PhotoUnreadable(
                    key, f"access denied ({code}) in bucket {self.bucket}"
                ) from exc
            self._raise(key, exc, "reading")
        except BotoCoreError as exc:
            self._raise(key, exc, "reading")

    def list(self, prefix: str = "") -> list[str]:
        """Every key under `prefix`, sorted; folder markers (keys ending in `/`) left out."""
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(
                    obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/")
                )
        except (ClientError, BotoCoreError) as exc:
            self._raise(prefix, exc, "listing")
        return sorted(keys)

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Put one object (a single PUT is atomic: readers see the old or the new bytes)."""
        if not key or "://" in key:
            raise StorageError(f"{key!r} is not a key in bucket {self.bucket}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            self._raise(key, exc, "writing")

    def delete(self, keys: Sequence[str]) -> None:
        """Delete objects, 1000 a request (S3's limit); a missing key is no error."""
        keys = list(keys)
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as exc:
                self._raise(batch[0], exc, "deleting")
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"deleting {len(errors)} of {len(batch)} objects in s3://{self.bucket} "
                    f"failed, first {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )


def s3_fetch(uri: str, dest: Path, *, client: S3Client | None = None) -> None:
    """A `worker.models.RemoteFetcher` for `s3://bucket/key` model URIs.

    Without `client`, boto3's default chain decides the endpoint too (e.g. `AWS_ENDPOINT_URL_S3`);
    the worker passes its own client so `AFTERTRIP_S3_ENDPOINT_URL` applies to models as well.
    """
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise StorageConfigError(f"{uri!r} names a bucket or folder, not a model file")
    s3 = client or make_client()
    try:
        s3.download_file(bucket, key, str(dest))
    except ClientError as exc:
        code, status = _error_code(exc)
        if code in _MISSING_CODES or status == 404:
            raise ModelNotFound(
                f"model {uri} does not exist: upload it or fix the setting"
            ) from exc
        if _is_transient(exc):
            raise TransientStorageError(uri, f"downloading failed: {exc}") from exc
        raise StorageError(f"downloading {uri} failed: {exc}") from exc
    except BotoCoreError as exc:
        if _is_transient(exc):
            raise TransientStorageError(uri, f"downloading failed: {exc}") from exc
        raise StorageError(f"downloading {uri} failed: {exc}") from exc
