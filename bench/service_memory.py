"""Big trips through the service: peak memory per worker process against the trip's size.

    python -m bench.service_memory --sizes 500 2000 [--workers 2] [--out bench/service_memory.json]

For each size, fresh `celery worker` processes (fan-out on, one thread each) group a trip of
that many LFW photos (../shared/data/faces-dev/lfw) stored in a moto S3 server, with a
PostgreSQL database and Redis on loopback (AFTERTRIP_TEST_REDIS_URL; database 13 unless
set). After the job, each pool process's peak resident memory (VmHWM) is read from /proc:
it must not grow with the trip. A warm-up trip of 150 photos runs first, so the models are
loaded in every process before the measured trip.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LFW = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces-dev" / "lfw"


def lfw_photos(count: int) -> list[Path]:
    """The first `count` LFW photos in a fixed order (sorted paths)."""
    paths = sorted(LFW.resolve().glob("*/*.jpg"))
    if len(paths) < count:
        raise SystemExit(f"need {count} photos under {LFW}, found {len(paths)}")
    return paths[:count]


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def measure(sizes: list[int], workers: int, chunk: int) -> dict[str, Any]:
    from moto.server import ThreadedMotoServer

    from db.session import make_engine, make_sessionmaker
    from db.webapp import Photo
    from storage import S3Store
    from tasks.client import enqueue_trip
    from tests.plugins.databases import add_trip as add_trip_row
    from tests.plugins.databases import fresh_database, prepare_database
    from tests.plugins.s3 import moto_client
    from tests.support.services import (
        REDIS_URL,
        child_pids,
        client_app,
        start_worker,
        stop_process,
        worker_environment,
    )

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    results: dict[str, Any] = {"workers": workers, "chunk_photos": chunk, "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="aftertrip-memory-"))
    try:
        with fresh_database("postgresql", tmp) as db_url:
            prepare_database(db_url)
            bucket = f"aftertrip-memory-{uuid.uuid4().hex[:8]}"
            s3 = moto_client(endpoint)
            s3.create_bucket(Bucket=bucket)
            store = S3Store(bucket, client=s3)
            engine = make_engine(db_url)
            sessions = make_sessionmaker(engine)
            queue = f"faces-memory-{uuid.uuid4().hex[:8]}"
            env = worker_environment(
                db_url=db_url,
                bucket=bucket,
                s3_endpoint=endpoint,
                queue=queue,
                tmp=tmp,
                threads="1",
                chunk_photos=str(chunk),
            )
            app = client_app(REDIS_URL)

            def add_trip(paths: list[Path]) -> int:
                with sessions() as session:
                    # The real schema: a trip needs its accounts_group row.
                    trip = add_trip_row(session, place="LFW")
                    for path in paths:
                        photo = Photo(
                            trip_id=trip.id, file_key=uuid.uuid4(), file_name=path.name, url=""
                        )
                        session.add(photo)
                        session.flush()
                        store.write(photo.s3_key, path.read_bytes(), "image/jpeg")
                    session.commit()
                    return trip.id

            def run(trip_id: int) -> tuple[dict[str, Any], float]:
                started = time.perf_counter()
                pending = enqueue_trip(trip_id, mode="all", app=app, queue=queue)
                value = dict(pending.get(timeout=3600))
                return value, time.perf_counter() - started

            photos = lfw_photos(max(sizes))
            warm = add_trip(photos[:150])
            for size in sizes:
                trip = add_trip(photos[:size])
                procs = [
                    start_worker(env, tmp / f"w{size}-{n}.log", queue=queue, name=f"mem{n}")
                    for n in range(workers)
                ]
                try:
                    run(warm)
                    value, seconds = run(trip)
                    peaks = [
                        round(peak_rss_mb(child), 1)
                        for proc in procs
                        for child in child_pids(proc.pid)
                    ]
                finally:
                    for proc in procs:
                        stop_process(proc)
                entry = {
                    "photos": size,
                    "seconds": round(seconds, 1),
                    "photos_per_s": round(size / seconds, 2),
                    "faces": value["faces"],
                    "people": value["people"],
                    "peak_rss_mb_per_worker_process": peaks,
                }
                logger.info("%s", entry)
                results["runs"].append(entry)
            engine.dispose()
            from redis import Redis

            Redis.from_url(REDIS_URL).delete(queue)
    finally:
        server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = measure(args.sizes, args.workers, args.chunk)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
