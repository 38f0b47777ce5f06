"""Fault injection for the worker service: servers that a test can stop, links it can cut.

Nothing here touches the shared loopback servers: Redis is a private `redis-server` on a
port of its own (stopped and started again by the test), PostgreSQL is the shared server
reached through a `TcpProxy` (cutting the proxy is the outage; the server stays up), and S3
is a private `moto_server` process, also behind a proxy. `fault_stack()` assembles all of it
with a fresh database, a bucket, a unique queue and the AFTERTRIP_* environment of a worker;
`FaultWorker` is a real `celery -A tasks.app worker` whose pool children can be SIGKILLed.

    with fault_stack(tmp_path) as stack:
        worker = stack.start_worker()
        trip_id, photo_ids = stack.add_trip([("a.jpg", jpeg_bytes)])
        pending = stack.enqueue(trip_id)
        stack.postgres.cut()       # the database is unreachable ...
        stack.postgres.restore()   # ... until now
        stack.wait(pending)
        stack.assert_settled(trip_id)

The proxies run on threads inside the test process; `cut()` resets every open connection
and refuses new ones (a server that died), `freeze()` accepts and holds bytes without
answering (a network that drops packets) until `restore()`; `silence()` makes the connections
open now pass nothing, for good, without a reset (a NAT that forgot them), and
`stall_next_response(after)` lets the next long answer (an S3 body) through up to `after`
bytes, then silences its connection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from tests.plugins.s3 import MOTO_ENV
from tests.support.files import ROOT
from tests.support.services import (
    child_pids,
    client_app,
    free_port,
    start_worker,
    stop_process,
    tail,
)


def wait_for_port(
    port: int, *, timeout: float = 30, process: subprocess.Popen[Any] | None = None
) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited ({process.returncode}) before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# --- a TCP proxy that can be cut ------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`; `cut()`/`freeze()` simulate an outage."""

    def __init__(self, target_host: str, target_port: int, *, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._flowing = threading.Event()  # cleared while frozen
        self._flowing.set()
        self._silenced: set[socket.socket] = set()  # connections gone silent (silence())
        self._speaking = threading.Event()  # cleared while some are silent
        self._speaking.set()
        self._stall_after: int | None = None  # armed by stall_next_response()
        self.stalled_at: float | None = None  # time.monotonic() of the last stall
        self.connections_made = 0

    # lifecycle
    def start(self) -> TcpProxy:
        """Listen (again) on the proxy's port."""
        with self._lock:
            if self._listener is not None:
                return self
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            self._listener = listener
        self._accepting = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"proxy-{self.port}", daemon=True
        )
        self._accepting.start()
        return self

    def cut(self) -> None:
        """The server is gone: reset every open connection and refuse new ones."""
        self._flowing.set()  # a frozen pump must wake up to notice its sockets are closed
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in connections:
            _reset(conn)
        if self._accepting is not None:
            self._accepting.join(timeout=5)

    def freeze(self) -> None:
        """The network drops packets: connections open but no byte goes through."""
        self._flowing.clear()

    def silence(self) -> None:
        """The connections open now go silent, for good: no byte passes either way and none
        is reset (a NAT that forgot them); new connections work."""
        with self._lock:
            self._silenced |= self._connections
            self._speaking.clear()

    def stall_next_response(self, after: int) -> None:
        """The next answer of the server longer than `after` bytes (an S3 GetObject body, say)
        passes its first `after` bytes, then its connection goes silent for good, as
        `silence()`: the client waits mid-read. Once; other connections are left alone."""
        with self._lock:
            self._stall_after = after
            self.stalled_at = None

    def restore(self) -> None:
        """End a cut or a freeze (connections silenced stay silent)."""
        self._flowing.set()
        self.start()

    def close(self) -> None:
        self.cut()

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    # internals
    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _addr = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _reset(client)
                    _reset(upstream)
                    return
                self._connections.update((client, upstream))
                self.connections_made += 1
            answer = _Answer()
            for source, sink, answering in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, sink, answer, answering), daemon=True
                ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, answer: _Answer, answering: bool
    ) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if not answering:
                    answer.length = 0  # a new request: what comes back is a new answer
                elif self._stall_after is not None:
                    data = self._maybe_stall(source, sink, answer, data)
                answer.length += len(data)
                while source in self._silenced:  # never again, until the proxy closes
                    self._speaking.wait(1)
                    if self.is_cut:
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(source)
                self._connections.discard(sink)
            _reset(sink)
            _reset(source)

    def _maybe_stall(
        self, source: socket.socket, sink: socket.socket, answer: _Answer, data: bytes
    ) -> bytes:
        """`data` as it may pass; past an armed stall's bytes, the rest is held back and the
        connection silenced (the pump then waits in the silence)."""
        with self._lock:
            after = self._stall_after
            if after is None or answer.length + len(data) <= after:
                return data
            self._stall_after = None
            self._silenced |= {source, sink}
            self._speaking.clear()
            self.stalled_at = time.monotonic()
        head = data[: max(0, after - answer.length)]
        if head:
            sink.sendall(head)
        return data[len(head) :]


@dataclass
class _Answer:
    """Bytes the server has sent since the client's last request, on one proxied connection."""

    length: int = 0


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer's kernel would.

    A pump thread is blocked in `recv` on every proxied socket, and a socket closed under a
    blocked reader is not released (nor reset) until that read returns: the peer would see a
    connection that neither answers nor fails, forever if it is waiting for an answer (a query
    in flight when the link was cut). Shutting the reading side first wakes the reader, so
    the close takes effect and the peer gets its RST now."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


# --- a private redis-server -----------------------------------------------------------------


class PrivateRedis:
    """A `redis-server` of the test's own on its own port, with an append-only file so that a
    restart keeps the queue (as a production broker's persistence would)."""

    def __init__(self, workdir: Path, *, port: int | None = None, persistent: bool = True) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> PrivateRedis:
        if self.process is not None and self.process.poll() is None:
            return self
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--logfile", str(self.log),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (a clean shutdown that flushes the append-only file) or SIGKILL (a crash)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.process.wait(timeout=30)

    def restart(self, down_for: float = 0.0, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()

    def client(self, db: int = 0) -> Any:
        from redis import Redis

        return Redis.from_url(self.url(db), socket_connect_timeout=2)


# --- a moto S3 server in a process of its own -------------------------------------------------


class MotoProcess:
    """`moto_server` on a port of its own; its buckets live as long as the process."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log = workdir / "moto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoProcess:
        with self.log.open("wb") as handle:
            self.process = subprocess.Popen(
                ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, **MOTO_ENV},
                start_new_session=True,
            )
        wait_for_port(self.port, process=self.process, timeout=60)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)


# --- a real celery worker --------------------------------------------------------------------


@dataclass
class FaultWorker:
    """A `celery -A tasks.app worker` process started by a test."""

    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        """The prefork pool's processes (where jobs run)."""
        return child_pids(self.pid) if self.process.poll() is None else []

    def kill_child(self) -> int:
        """SIGKILL the (only) pool process, as the kernel's OOM killer would; its pid."""
        children = self.children()
        if len(children) != 1:
            raise AssertionError(f"expected one pool process, found {children}\n{tail(self.log)}")
        os.kill(children[0], signal.SIGKILL)
        return children[0]

    def kill(self) -> None:
        """SIGKILL the main process and its pool (the node died)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.process)

    def dump_stacks(self) -> None:
        """Have the worker and its pool write every thread's stack to the log (the test
        hooks' `DUMP_STACKS_SIGNAL`)."""
        from tests.support.servicehooks import DUMP_STACKS_SIGNAL

        for pid in [self.pid, *self.children()]:  # one at a time: they share the log
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, DUMP_STACKS_SIGNAL)
                time.sleep(0.5)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 80) -> str:
        return tail(self.log, lines)


# --- everything together ---------------------------------------------------------------------


@dataclass
class FaultStack:
    """Private Redis, PostgreSQL and S3 behind proxies, a database, a bucket and a queue."""

    tmp: Path
    redis: PrivateRedis
    postgres: TcpProxy
    moto: MotoProcess
    s3: TcpProxy
    db_url: str  # through the proxy
    direct_db_url: str  # the server itself, for the test's own checks during an outage
    bucket: str
    queue: str
    env: dict[str, str]
    engine: Engine
    sessions: sessionmaker[Session]
    app: Any
    workers: list[FaultWorker] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)

    @property
    def s3_endpoint(self) -> str:
        """The endpoint the worker uses (through the proxy)."""
        return f"http://127.0.0.1:{self.s3.port}"

    def s3_client(self) -> Any:
        """A boto3 client that talks to moto directly (works while the proxy is cut)."""
        from tests.plugins.s3 import moto_client

        return moto_client(self.moto.endpoint)

    def start_worker(self, name: str = "faults", **env: str) -> FaultWorker:
        """A real worker on this stack's queue; `env` adds or overrides AFTERTRIP_* settings."""
        log = self.tmp / f"worker-{name}-{len(self.workers)}.log"
        queue = env.get("AFTERTRIP_QUEUE", self.queue)
        process = start_worker({**self.env, **env}, log, queue=queue, name=name)
        worker = FaultWorker(process, log)
        self.workers.append(worker)
        return worker

    def add_trip(self, photos: list[tuple[str, bytes | None]]) -> tuple[int, list[int]]:
        """A trip whose photos are uploaded under their `str(file_key)` (None = no object)."""
        from db.webapp import Photo
        from storage import S3Store
        from tests.plugins.databases import add_trip

        store = S3Store(self.bucket, client=self.s3_client())
        with self.sessions() as session:
            # The real schema: a trip needs its accounts_group row.
            trip = add_trip(session, place="Jeju")
            ids = []
            for name, data in photos:
                photo = Photo(trip_id=trip.id, file_key=uuid.uuid4(), file_name=name, url="")
                session.add(photo)
                session.flush()
                if data is not None:
                    store.write(photo.s3_key, data, "image/jpeg")
                ids.append(photo.id)
            session.commit()
            return trip.id, ids

    def enqueue(self, trip_id: int, mode: str = "missing") -> Any:
        from tasks.client import enqueue_trip

        result = enqueue_trip(trip_id, mode=mode, app=self.app, queue=self.queue)
        self.task_ids.append(result.id)
        return result

    def wait(self, result: Any, timeout: float = 300) -> dict[str, Any]:
        """The job's return value; on failure, an AssertionError with the workers' logs."""
        try:
            return dict(result.get(timeout=timeout, interval=0.2))
        except Exception as exc:
            logs = "\n".join(f"--- {w.log.name}\n{w.tail()}" for w in self.workers)
            raise AssertionError(f"job failed: {exc!r}\n{logs}") from exc

    def wait_for_stage(self, result: Any, stage: str, done: int = 0, timeout: float = 300) -> None:
        """Wait until the job reports PROGRESS at `stage` with at least `done` photos."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = result.info if result.state == "PROGRESS" else None
            if isinstance(info, dict) and info.get("stage") == stage and info["done"] >= done:
                return
            if result.ready():
                raise AssertionError(f"the job ended ({result.state}) before {stage}/{done}")
            time.sleep(0.05)
        raise AssertionError(f"the job never reached {stage}/{done}")

    def jobs(self, trip_id: int) -> list[Any]:
        from db.models import Job

        with self.sessions() as session:
            return list(session.scalars(select(Job).where(Job.trip_id == trip_id).order_by(Job.id)))

    def lock_holder(self, trip_id: int) -> str | None:
        from tasks.locks import trip_lock_name

        value = self.redis.client().get(trip_lock_name(trip_id))
        return value.decode() if isinstance(value, bytes) else value

    def held_job(
        self, hold: Path, photos: list[tuple[str, bytes | None]], *, timeout: float = 300
    ) -> tuple[Any, int]:
        """A new trip of `photos` whose job the hold hook (tests/support/servicehooks.py,
        AFTERTRIP_TEST_HOLD_DIR=`hold`) holds once it has its lock and its `running` row; the
        job's AsyncResult and the trip's id. Remove `hold/hold` to let it go."""
        from tests.support.services import held_jobs, wait_for

        trip_id, _ids = self.add_trip(photos)
        (hold / "hold").touch()
        pending = self.enqueue(trip_id, mode="all")
        logs = "\n".join(w.tail() for w in self.workers)
        wait_for(
            lambda: any(name.startswith(f"held-{trip_id}-") for name in held_jobs(hold)),
            f"the job of trip {trip_id} to start\n{logs}",
            timeout=timeout,
        )
        return pending, trip_id

    def assert_completed_once(self, trip_id: int, result: dict[str, Any], photos: int) -> Any:
        """One job row, succeeded; every one of the trip's `photos` analysed once and sorted;
        nothing left running or locked, and nothing left unacknowledged in the broker (a lost
        acknowledgement would have the job delivered again after the visibility timeout)."""
        from tests.support.services import wait_for

        assert result["analyzed"] == photos, result
        jobs = self.jobs(trip_id)
        assert len(jobs) == 1, [(j.id, j.status, j.celery_task_id) for j in jobs]
        (job,) = jobs
        assert job.status == "succeeded", (job.status, job.error)
        self.assert_settled(trip_id)
        self.assert_no_duplicates(trip_id)
        snapshot = self.snapshot(trip_id)
        assert len(snapshot["analyses"]) == photos  # none lost, none twice
        assert {status for _photo, status in snapshot["analyses"]} == {"ok"}
        assert snapshot["links"], "the photos were sorted into folders"
        wait_for(lambda: self.unacked() == 0, "the job's message to be acknowledged", 60)
        return job

    def unacked(self) -> int:
        """Messages the broker delivered and waits to see acknowledged (kombu's Redis transport
        keeps them in its `unacked` hash): each would be delivered again after the visibility
        timeout, hours later."""
        return int(self.redis.client().hlen("unacked"))

    def job_finished(self, trip_id: int) -> bool:
        """Whether the trip's job rows all ended (succeeded or failed), read directly."""
        jobs = self.jobs(trip_id)
        return bool(jobs) and all(j.status in ("succeeded", "failed") for j in jobs)

    def snapshot(self, trip_id: int) -> dict[str, list[tuple[Any, ...]]]:
        """Every row a job writes for a trip (links, folders, faces, analyses), comparable."""
        from db.models import Face, PhotoAnalysis
        from db.webapp import Photo, PhotoTagFace, TagFace

        with self.sessions() as session:
            photo_ids = select(Photo.id).where(Photo.trip_id == trip_id)
            links = session.execute(
                select(PhotoTagFace.photo_id, PhotoTagFace.tagface_id).where(
                    PhotoTagFace.photo_id.in_(photo_ids)
                )
            ).all()
            tags = session.execute(
                select(TagFace.id, TagFace.tag_num).where(
                    TagFace.id.in_({tag for _photo, tag in links})
                )
            ).all()
            faces = session.execute(
                select(Face.photo_id, Face.face_index, Face.tagface_id).where(
                    Face.photo_id.in_(photo_ids)
                )
            ).all()
            analyses = session.execute(
                select(PhotoAnalysis.photo_id, PhotoAnalysis.status).where(
                    PhotoAnalysis.photo_id.in_(photo_ids)
                )
            ).all()
        return {
            "links": sorted(tuple(r) for r in links),
            "tags": sorted(tuple(r) for r in tags),
            "faces": sorted(tuple(r) for r in faces),
            "analyses": sorted(tuple(r) for r in analyses),
        }

    def report_failure(self) -> None:
        """On a failed test (before anything is stopped): every worker's stacks and log, and
        the job rows, to stderr, where pytest shows them with the failure."""
        import sys

        from db.models import Job

        for worker in self.workers:
            if worker.process.poll() is None:
                worker.dump_stacks()
        with contextlib.suppress(Exception), self.sessions() as session:
            for job in session.scalars(select(Job).order_by(Job.id)):
                sys.stderr.write(
                    f"job {job.id}: trip {job.trip_id} {job.status} attempts={job.attempts} "
                    f"heartbeat={job.heartbeat_at} error={job.error!r}\n"
                )
        for worker in self.workers:
            sys.stderr.write(f"--- {worker.log.name} (pid {worker.pid})\n{worker.text()}\n")

    def assert_settled(self, trip_id: int) -> None:
        """No job row of the trip left running/queued/retrying, and no trip lock behind."""
        jobs = [(j.id, j.celery_task_id, j.status, j.error) for j in self.jobs(trip_id)]
        unsettled = [j for j in jobs if j[2] not in ("succeeded", "failed")]
        assert not unsettled, f"job rows left unsettled: {unsettled}"
        holder = self.lock_holder(trip_id)
        assert holder is None, f"trip {trip_id} lock still held by {holder}"

    def assert_no_duplicates(self, trip_id: int) -> None:
        """Every (photo, folder) link, face and analysis row exists once."""
        snapshot = self.snapshot(trip_id)
        for kind in ("links", "faces", "analyses"):
            rows = snapshot[kind]
            keys = rows if kind == "links" else [r[:2] for r in rows]
            assert len(keys) == len(set(keys)), f"duplicate {kind}: {rows}"


@contextlib.contextmanager
def fault_stack(tmp: Path, *, detector: str = "scrfd") -> Iterator[FaultStack]:
    """Private Redis, the shared PostgreSQL behind a proxy, moto S3 behind a proxy, a fresh
    database with the web app's tables, a bucket and a queue; everything stopped afterwards.

    Skips (fails under CI=true) when PostgreSQL on loopback does not answer.
    """
    from db.session import make_engine, make_sessionmaker
    from tests.plugins.databases import SERVER_URLS, fresh_database, prepare_database
    from tests.plugins.s3 import moto_client

    tmp.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis = PrivateRedis(tmp / "redis").start()
        stack.callback(redis.stop)

        direct_db_url = stack.enter_context(fresh_database("postgresql", tmp))
        prepare_database(direct_db_url)
        server = make_url(SERVER_URLS["postgresql"])
        pg_proxy = TcpProxy(server.host or "127.0.0.1", server.port or 5432).start()
        stack.callback(pg_proxy.close)
        db_url = (
            make_url(direct_db_url)
            .set(host="127.0.0.1", port=pg_proxy.port)
            .render_as_string(hide_password=False)
        )

        moto = MotoProcess(tmp).start()
        stack.callback(moto.stop)
        s3_proxy = TcpProxy("127.0.0.1", moto.port).start()
        stack.callback(s3_proxy.close)
        bucket = f"aftertrip-faults-{uuid.uuid4().hex[:10]}"
        moto_client(moto.endpoint).create_bucket(Bucket=bucket)

        queue = f"faces-faults-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
        env.update(MOTO_ENV)
        env.update(
            {
                "AFTERTRIP_BROKER_URL": redis.url(0),
                "AFTERTRIP_RESULT_BACKEND": redis.url(1),
                "AFTERTRIP_DATABASE_URL": db_url,
                "AFTERTRIP_S3_BUCKET": bucket,
                "AFTERTRIP_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_proxy.port}",
                "AFTERTRIP_QUEUE": queue,
                "AFTERTRIP_DETECTOR": detector,
                "AFTERTRIP_DEVICE": "cpu",
                "AFTERTRIP_THREADS": "1",
                "AFTERTRIP_LOCK_WAIT_SECONDS": "1",
                "AFTERTRIP_MODEL_CACHE_DIR": str(tmp / "models"),
                "PYTHONPATH": str(ROOT),
            }
        )
        # The test's own view of the database goes to the server directly: it must be able
        # to look while the worker's link is cut.
        engine = make_engine(direct_db_url)
        stack.callback(engine.dispose)
        app = client_app(redis.url(0))
        app.conf.result_backend = redis.url(1)
        # The test waits on results through the Redis it restarts: reads that meet it down
        # or still loading its data (BusyLoadingError, longer on a loaded machine) are tried
        # again instead of failing the wait.
        app.conf.update(result_backend_always_retry=True, result_backend_max_retries=60)
        faults = FaultStack(
            tmp=tmp,
            redis=redis,
            postgres=pg_proxy,
            moto=moto,
            s3=s3_proxy,
            db_url=db_url,
            direct_db_url=direct_db_url,
            bucket=bucket,
            queue=queue,
            env=env,
            engine=engine,
            sessions=make_sessionmaker(engine),
            app=app,
        )

        def stop_workers() -> None:
            for worker in faults.workers:
                # a worker waiting on a cut link would wait out its timeouts first
                faults.postgres.restore()
                faults.s3.restore()
                stop_process(worker.process, timeout=20)

        stack.callback(stop_workers)
        try:
            yield faults
        except BaseException:
            faults.report_failure()
            raise
