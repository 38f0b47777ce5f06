"""Where photos and face thumbnails live: one small interface over S3 and local folders.

`PhotoStore.read(key) -> bytes`, `list(prefix) -> list[str]`, `write(key, data, content_type)`.
"""

from storage.base import PhotoStore, photo_sources
from storage.errors import NotARegularFile, StorageConfigError, StorageError, TransientStorageError
from storage.local import InvalidStorageKey, LocalStore
from storage.s3 import S3Store, make_client, parse_s3_uri, s3_fetch

__all__ = [
    "InvalidStorageKey",
    "LocalStore",
    "NotARegularFile",
    "PhotoStore",
    "S3Store",
    "StorageConfigError",
    "StorageError",
    "TransientStorageError",
    "make_client",
    "parse_s3_uri",
    "photo_sources",
    "s3_fetch",
]
