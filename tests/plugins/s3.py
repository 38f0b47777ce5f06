"""S3 for tests: moto in server mode on loopback, a real HTTP endpoint boto3 talks to.

A pytest plugin (tests/conftest.py): a test asks for `moto_endpoint` or `s3_bucket` by name;
`moto_client` and `MOTO_ENV` are imported from here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

# moto accepts any credentials; they are given explicitly so a developer's real AWS
# profile is never read (or used) by the tests.
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def moto_client(endpoint: str, **config: Any) -> Any:
    """A boto3 S3 client for the moto server with test credentials."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=MOTO_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=MOTO_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=MOTO_ENV["AWS_DEFAULT_REGION"],
        config=Config(**config) if config else None,
    )


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """`http://127.0.0.1:<port>` of a moto S3 server started for this test session."""
    from moto.server import ThreadedMotoServer

    # one INFO line per request would bury a failing test's own output
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server (a unique name per test)."""
    name = f"aftertrip-test-{uuid.uuid4().hex[:12]}"
    moto_client(moto_endpoint).create_bucket(Bucket=name)
    return name
