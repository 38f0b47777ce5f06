"""A photo store over a local folder (development, the embedded demo, tests)."""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from storage.errors import DEFAULT_MAX_OBJECT_BYTES, NotARegularFile, StorageError
from worker.errors import ImageTooLarge, PhotoUnreadable

logger = logging.getLogger(__name__)

_PARTIAL_SUFFIX = ".aftertrip-partial"


class InvalidStorageKey(StorageError, ValueError):
    """A key that is absolute, climbs out of the store's root, or is empty."""


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


class LocalStore:
    """Keys are `/`-separated paths relative to `root`.

    Only regular files are ever opened (a FIFO or a device would block or never end). With
    `follow_links=False` (the service's development store) nothing outside `root` is touched,
    not even through a symlink; `follow_links=True` is for a local album, which is the user's
    own files: a link in it may point at a regular file anywhere.
    """

    def __init__(
        self,
        root: Path,
        *,
        follow_links: bool = False,
        max_file_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.follow_links = follow_links
        self.max_file_bytes = max_file_bytes

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        posix = PurePosixPath(key)
        if not key or posix.is_absolute() or ".." in posix.parts or "\\" in key:
            raise InvalidStorageKey(f"{key!r} is not a relative key inside {self.root}")
        if self.follow_links:
            return self.root / posix
        try:
            path = (self.root / posix).resolve()
        except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError on a loop
            raise InvalidStorageKey(f"{key!r} is a symbolic link loop") from exc
        # resolve() follows symlinks, so a link inside root that points outside is refused too.
        if not path.is_relative_to(self.root):
            raise InvalidStorageKey(f"{key!r} resolves outside {self.root}")
        return path

    def read(self, key: str) -> bytes:
        """The file's bytes; `PhotoUnreadable` if the key is invalid, missing or unreadable,
        `NotARegularFile` (never opened for reading) if it is a FIFO, socket, device or folder."""
        try:
            path = self._path(key)
        except InvalidStorageKey as exc:
            raise PhotoUnreadable(key, str(exc)) from exc
        try:
            # stat first so a device is never even opened; fstat after, against a swap between
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise NotARegularFile(key, f"is {_kind(mode)}, not a regular file: skipped")
            # O_NONBLOCK: if it became a FIFO meanwhile, open() must not wait for a writer
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            where = "a link to a file that does not exist" if _is_link(path) else "no such file"
            raise PhotoUnreadable(key, f"{where} in {self.root}") from exc
        except PermissionError as exc:
            raise PhotoUnreadable(key, "permission denied") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PhotoUnreadable(key, "is a symbolic link loop") from exc
            raise PhotoUnreadable(key, f"cannot be opened ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFile(key, f"is {_kind(info.st_mode)}, not a regular file: skipped")
            if info.st_size > self.max_file_bytes:
                raise ImageTooLarge(
                    key,
                    f"the file is {info.st_size / 2**20:,.0f} MiB, over the "
                    f"{self.max_file_bytes / 2**20:,.0f} MiB a photo may have",
                )
            try:
                return handle.read()
            except OSError as exc:  # an I/O error of the disk, or a file turned into a folder
                raise PhotoUnreadable(key, f"cannot be read ({exc.strerror})") from exc

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


def _is_link(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:
        return False
