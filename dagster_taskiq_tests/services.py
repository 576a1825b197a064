"""Where the test brokers are, and whether a test may skip when one is missing."""

import os
import socket
from urllib.parse import urlsplit

import dagster
import pytest

from dagster_taskiq_tests.containers import (
    AMQP_ENV,
    REDIS_ENV,
    answers,
    docker_client,
    prepare_brokers,
)

#: Where this session's brokers come from (see :mod:`.containers`): decided on first import.
BROKER_SOURCE = prepare_brokers(os.environ, docker_client, answers)
REDIS_URL = os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get(AMQP_ENV, "amqp://guest:guest@127.0.0.1:5672/")


def reachable(url: str, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``url``'s host and port succeeds."""
    parts = urlsplit(url)
    default_port = 6379 if parts.scheme.startswith("redis") else 5672
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout
        ):
            return True
    except OSError:
        return False


def under_ci() -> bool:
    """CI sets CI=true; there broker tests must run, never skip."""
    return os.environ.get("CI", "").lower() == "true"


def require(url: str, what: str) -> None:
    """Skip (locally) or fail (under CI) when ``url`` is not reachable."""
    if reachable(url):
        return
    reason = f"{what} is not reachable at {urlsplit(url).hostname}:{urlsplit(url).port}"
    if under_ci():
        pytest.fail(f"{reason}; under CI=true broker tests must run (see .ci/run).")
    pytest.skip(f"{reason}; start it to run the broker tests.")


def broker_report_line() -> str:
    """One line for pytest's header: which brokers this session uses."""
    redis_at, amqp_at = urlsplit(REDIS_URL).netloc, urlsplit(AMQP_URL).netloc.split("@")[-1]
    return f"dagster-taskiq test brokers: {BROKER_SOURCE.value} (redis {redis_at}, amqp {amqp_at})"


def dagster_minor_version() -> int:
    """The minor version of the installed Dagster (12 for 1.12.x): a few assertions differ."""
    return int(dagster.__version__.split(".")[1])
