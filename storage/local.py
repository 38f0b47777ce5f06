"""A photo store over a local folder (development, the embedded demo, tests)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from storage.errors import StorageError
from worker.errors import PhotoUnreadable

logger = logging.getLogger(__name__)

_PARTIAL_SUFFIX = ".aftertrip-partial"


class InvalidStorageKey(StorageError, ValueError):
    """A key that is absolute, climbs out of the store's root, or is empty."""


class LocalStore:
    """Keys are `/`-separated paths relative to `root`; nothing outside `root` is ever touched."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        posix = PurePosixPath(key)
        if not key or posix.is_absolute() or ".." in posix.parts or "\\" in key:
            raise InvalidStorageKey(f"{key!r} is not a relative key inside {self.root}")
        path = (self.root / posix).resolve()
        # resolve() follows symlinks, so a link inside root that points outside is refused too.
        if not path.is_relative_to(self.root):
            raise InvalidStorageKey(f"{key!r} resolves outside {self.root}")
        return path

    def read(self, key: str) -> bytes:
        """The file's bytes; `PhotoUnreadable` if the key is invalid, missing or unreadable."""
        try:
            return self._path(key).read_bytes()
        except InvalidStorageKey as exc:
            raise PhotoUnreadable(key, str(exc)) from exc
        except FileNotFoundError as exc:
            raise PhotoUnreadable(key, f"no such file in {self.root}") from exc
        except IsADirectoryError as exc:
            raise PhotoUnreadable(key, "is a folder, not a file") from exc
        except PermissionError as exc:
            raise PhotoUnreadable(key, "permission denied") from exc

    def list(self, prefix: str = "") -> list[str]:
        """Every file key under root that starts with `prefix`, sorted."""
        keys: list[str] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith(_PARTIAL_SUFFIX):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write atomically (temporary file, then rename) so readers never see half a file."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, keys: Sequence[str]) -> None:
        """Remove these files; a missing one is no error."""
        for key in keys:
            self._path(key).unlink(missing_ok=True)
