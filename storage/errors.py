"""Errors of the storage layer that are not about one photo.

A missing or forbidden object is a fact about that photo and is raised as
`worker.errors.PhotoUnreadable`, which the pipeline records as the photo's error. A
throttled request, a 5xx answer or a dropped connection says nothing about the photo:
it is raised as `TransientStorageError` so that the Celery task retries the whole job
later instead of recording a photo as missing.
"""

from __future__ import annotations

from worker.errors import AfterTripError, PhotoUnreadable
from worker.types import PhotoStatus

DEFAULT_MAX_OBJECT_BYTES = 256 * 1024 * 1024
"""The largest photo file a store reads (its bytes are held in memory while it decodes)."""


class StorageError(AfterTripError):
    """Base class of the storage layer's own errors."""


class TransientStorageError(StorageError):
    """Storage did not answer in time or asked us to slow down; trying again later may work."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class StorageConfigError(StorageError):
    """The storage layer is misconfigured (no bucket, bad URI)."""


class NotARegularFile(PhotoUnreadable):
    """A FIFO, socket, device or folder where a photo was expected: skipped, never opened."""

    status = PhotoStatus.UNSUPPORTED
