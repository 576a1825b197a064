"""What every ``dagster-taskiq`` command shares: config loading, connection options, one-line
user errors, bounded connections, and plain-text tables.

Every command takes ``-y/--config-yaml FILE`` (shaped like the executor config,
``execution: {config: {...}}``, and validated against the same schema) plus ``--broker`` and
``--backend`` overrides. A user error (bad config, unreachable broker, unknown worker) prints one
line and exits 1; usage errors exit 2 (click's default).
"""

import asyncio
import datetime
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
import yaml

from dagster_taskiq.config import TaskiqSettings, redact_url, resolve_settings
from dagster_taskiq.errors import DagsterTaskiqError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Longest a one-shot command waits for the broker and backend before giving up. With Python's
#: start-up this keeps "unreachable broker" well within the 10 s the interface promises.
CONNECT_DEADLINE = 4.0
#: Longest a one-shot command's work may take once connected.
OPERATION_DEADLINE = 20.0
#: How long ``worker start -d`` waits for the detached worker to register.
BACKGROUND_START_TIMEOUT = 60.0
#: Libraries that log every reconnect attempt; one-shot commands keep them quiet.
NOISY_LOGGERS = ("aio_pika", "aiormq")
#: Top-level keys a ``--config-yaml`` file may have.
CONFIG_FILE_KEYS = frozenset({"execution"})


class UserError(click.ClickException):
    """A user error: printed as one line on stderr, exit code 1."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) turned into one space."""
    return " ".join(str(text).split())


# -- configuration -------------------------------------------------------------------------------
def read_config_file(path: str) -> dict[str, Any]:
    """The ``execution.config`` mapping of a ``--config-yaml`` file (``{}`` for an empty file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except OSError as exc:
        raise UserError(f"Cannot read config file {path}: {exc.strerror or exc}.") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"Config file {path} is not valid YAML{at}: {problem}.") from None
    if loaded is None:
        return {}
    shape = "Use the executor config's shape: 'execution: {config: {broker: ..., ...}}'."
    if not isinstance(loaded, dict):
        raise UserError(
            f"Config file {path} must be a mapping, got {type(loaded).__name__}. {shape}"
        )
    unknown = sorted(str(k) for k in loaded if k not in CONFIG_FILE_KEYS)
    if unknown:
        raise UserError(f"Config file {path} has unknown top-level key(s) {unknown}. {shape}")
    execution = loaded.get("execution")
    if execution is None:
        return {}
    if not isinstance(execution, dict) or set(execution) - {"config"}:
        raise UserError(f"In config file {path}, 'execution' must hold only 'config'. {shape}")
    config = execution.get("config")
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"In config file {path}, 'execution.config' must be a mapping. {shape}")
    return dict(config)


def load_settings(
    config_yaml: str | None, broker: str | None, backend: str | None
) -> TaskiqSettings:
    """Settings from a ``--config-yaml`` file (executor config shape) plus URL overrides."""
    from dagster_taskiq.compat import Field, process_config
    from dagster_taskiq.executor import executor_config_schema

    raw = read_config_file(config_yaml) if config_yaml else {}
    if broker:
        raw["broker"] = broker
    if backend:
        raw["backend"] = backend
    result = process_config(Field(executor_config_schema()).config_type, raw)
    if not result.success:
        errors = "; ".join(error.message for error in result.errors or [])
        raise UserError(f"Invalid config in {config_yaml or 'the options'}: {errors}")
    return resolve_settings(result.value or {})


def connection_options(func: F) -> F:
    """``-y/--config-yaml``, ``--broker`` and ``--backend`` for every command."""
    func = click.option(
        "--backend", default=None, help="Redis URL for results and the key store (overrides -y)."
    )(func)
    func = click.option("--broker", default=None, help="Broker URL (overrides -y).")(func)
    func = click.option(
        "-y",
        "--config-yaml",
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML file shaped like the executor config: execution: {config: {...}}.",
    )(func)
    return func


def user_errors(func: F) -> F:
    """Turn our errors, and connection failures, into one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DagsterTaskiqError as exc:
            raise UserError(str(exc)) from None
        except (TimeoutError, ConnectionError) as exc:
            raise UserError(f"Lost the connection to the broker or backend: {exc}") from None
        except Exception as exc:
            if _is_connection_error(exc):
                raise UserError(
                    f"Lost the connection to the broker or backend ({type(exc).__name__}: {exc})."
                ) from None
            raise

    return wrapper  # type: ignore[return-value]


def _is_connection_error(exc: BaseException) -> bool:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))


def with_connection(
    settings: TaskiqSettings,
    factory: Callable[[Any], Awaitable[T]],
    *,
    connect_only: bool = False,
    operation_timeout: float = OPERATION_DEADLINE,
) -> T:
    """Connect (within :data:`CONNECT_DEADLINE`), run ``factory(connection)`` (within
    ``operation_timeout``), then close. Each one-shot command runs one event loop, once.
    """
    from dagster_taskiq.connection import TaskiqConnection
    from dagster_taskiq.errors import BrokerUnavailableError

    deadline = min(settings.connect_timeout, CONNECT_DEADLINE)

    async def _main() -> T:
        conn = TaskiqConnection(settings)
        try:
            try:
                await asyncio.wait_for(conn.start(), deadline)
            except asyncio.TimeoutError:
                raise BrokerUnavailableError(
                    f"Could not reach the broker ({redact_url(settings.broker_url)}) or the "
                    f"backend ({redact_url(settings.backend_url)}) within {deadline:g} s. Start "
                    "them, or fix --broker/--backend or the -y config file."
                ) from None
            return await asyncio.wait_for(factory(conn), operation_timeout)
        finally:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:  # noqa: S110 - closing a connection that never opened
                pass

    quiet = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # a failed connect is reported in our one line, not in their retries
        logger.setLevel(logging.CRITICAL)
    try:
        return run_bounded(_main())
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def run_bounded(coro: Awaitable[T], cleanup_timeout: float = 0.5) -> T:
    """Run ``coro`` on a fresh event loop, then give leftover tasks ``cleanup_timeout`` seconds.

    ``asyncio.run`` would wait for every leftover task, and aio-pika keeps reconnecting in the
    background after a cancelled connection attempt, so a one-shot command could never exit.
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=cleanup_timeout))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- commands ------------------------------------------------------------------------------------


def format_time(timestamp: float) -> str:
    """``timestamp`` (epoch seconds) as an ISO 8601 UTC time, to the second."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``rows`` under ``headers`` as left-aligned plain-text columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )
