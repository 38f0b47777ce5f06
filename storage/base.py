"""The one small interface every photo store implements, and the bridge to the pipeline."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from worker.types import PhotoSource


@runtime_checkable
class PhotoStore(Protocol):
    """Where trip photos and face thumbnails live, addressed by key (a relative path)."""

    def read(self, key: str) -> bytes:
        """The object's bytes; `worker.errors.PhotoUnreadable` if it is missing or forbidden."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`, sorted."""
        ...

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key`, replacing what was there."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Remove these objects; a key that does not exist is no error."""
        ...


def photo_sources(
    store: PhotoStore,
    keys: Sequence[str],
    names: Sequence[str] | None = None,
    *,
    ids: Sequence[str] | None = None,
) -> list[PhotoSource]:
    """One `PhotoSource` per key whose `read` fetches the bytes only when called.

    The pipeline calls `read` on its decode threads, so downloads overlap detection and
    embedding. `names` default to the keys, `ids` (what results are matched back by) too.
    """
    if names is not None and len(names) != len(keys):
        raise ValueError(f"{len(names)} names for {len(keys)} keys")
    if ids is not None and len(ids) != len(keys):
        raise ValueError(f"{len(ids)} ids for {len(keys)} keys")
    return [
        PhotoSource(
            id=ids[i] if ids is not None else key,
            name=names[i] if names is not None else key,
            # partial binds this key now; a lambda in a loop would read the last key for all.
            read=functools.partial(store.read, key),
        )
        for i, key in enumerate(keys)
    ]
