"""Configuration shared by the executor, the run launcher and the CLI.

The executor config, the launcher config and the CLI's ``--config-yaml`` file all resolve to one
:class:`TaskiqSettings`. Defaults follow the interface contract: explicit config, then the
``DAGSTER_TASKIQ_*`` environment variables, then the run launcher's settings, then localhost.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from dagster import Any as ConfigAny
from dagster import Field, IntSource, Noneable, Shape, StringSource

from dagster_taskiq.errors import TaskiqConfigError
from dagster_taskiq.tags import validate_queue_name
from dagster_taskiq.urls import CLUSTER_SCHEMES, parse_redis_url, url_scheme
from dagster_taskiq.urls import REDIS_SCHEMES as REDIS_SCHEMES
from dagster_taskiq.urls import redact_url as redact_url

BROKER_ENV = "DAGSTER_TASKIQ_BROKER_URL"
BACKEND_ENV = "DAGSTER_TASKIQ_BACKEND_URL"
SIGNING_KEY_ENV = "DAGSTER_TASKIQ_SIGNING_KEY"
DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "dagster"
DEFAULT_HEARTBEAT_TIMEOUT = 30.0

RABBITMQ_SCHEMES = frozenset({"amqp", "amqps"})

#: Options of ``config_source`` that dagster-taskiq itself reads; anything else is handed to the
#: broker's connection (redis-py or aio-pika) unchanged.
KNOWN_SOURCE_OPTIONS = {
    "result_ttl": "seconds a task's result and record are kept after it finishes (default 86400)",
    "key_prefix": "prefix of every Redis key dagster-taskiq writes (default 'dagster_taskiq')",
    "connect_timeout": "seconds to wait for the broker or backend before failing (default 10)",
    "max_message_bytes": "largest task message accepted at submit time (default 4194304)",
    "exchange": "RabbitMQ exchange name (default 'dagster_taskiq')",
    "max_priority": "RabbitMQ x-max-priority of declared queues (default 10)",
    "qos": "RabbitMQ prefetch per consumer (default 1)",
    "queue_arguments": "extra RabbitMQ queue arguments, e.g. {'x-expires': 86400000}",
    "dead_letter_max": "how many rejected messages the dead-letter list keeps (default 1000)",
    "reconnect_timeout": "seconds a submit keeps retrying while the broker or backend is "
    "unreachable, before the step or run fails (default 60)",
    "confirm_timeout": "RabbitMQ: seconds a publish waits for the broker's confirm (default 10)",
    "queue_type": "RabbitMQ: 'classic' (default) or 'quorum' (replicated, with priority lanes)",
    "priority_lanes": "RabbitMQ quorum queues: priority lanes per queue (default 3)",
    "delivery_limit": "RabbitMQ quorum queues: deliveries before a message is dead-lettered "
    "(default 5)",
}

#: ``config_source`` keys handed to redis-py's connection (broker, backend and key store).
REDIS_CONNECTION_OPTIONS = {
    "ssl_ca_certs": "redis-py: CA bundle for rediss:// connections",
    "ssl_certfile": "redis-py: client certificate for rediss:// connections",
    "ssl_keyfile": "redis-py: client key for rediss:// connections",
    "ssl_cert_reqs": "redis-py: certificate check for rediss:// connections",
    "ssl_check_hostname": "redis-py: host name check for rediss:// connections",
    "username": "redis-py: ACL user (else from the URL)",
    "password": "redis-py: password (else from the URL); write it as {env: VAR}",
    "max_connections": "redis-py: connection pool size",
    "sentinel_username": "Sentinel URLs: ACL user of the sentinels themselves (if they have one)",
    "sentinel_password": "Sentinel URLs: password of the sentinels themselves (the URL's "
    "password is the master's); write it as {env: VAR}",
}

#: ``config_source`` keys handed to the RabbitMQ connection (aio-pika ``connect_robust``).
AMQP_CONNECTION_OPTIONS = {
    "timeout": "aio-pika: seconds to connect (default: connect_timeout)",
    "heartbeat": "aio-pika: AMQP heartbeat in seconds",
    "name": "aio-pika: connection name shown in the RabbitMQ management UI",
    "client_properties": "aio-pika: AMQP client properties",
    "ssl_options": "aio-pika: TLS options (cafile, certfile, keyfile, no_verify_ssl)",
    "reconnect_interval": "aio-pika: seconds between reconnection attempts",
    "fail_fast": "aio-pika: fail at once when the first connection attempt fails",
}


def valid_source_options() -> dict[str, str]:
    """Every key ``config_source`` accepts, with what it means."""
    return {**KNOWN_SOURCE_OPTIONS, **REDIS_CONNECTION_OPTIONS, **AMQP_CONNECTION_OPTIONS}


def check_config_source(source: Mapping[str, Any]) -> None:
    """Raise :class:`TaskiqConfigError` naming the valid keys if ``source`` has an unknown key."""
    valid = valid_source_options()
    unknown = sorted(str(key) for key in source if key not in valid)
    if unknown:
        raise TaskiqConfigError(
            f"Unknown config_source key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}. Valid keys: {', '.join(sorted(valid))}."
        )


def broker_kind(url: str) -> str:
    """``"redis"`` or ``"rabbitmq"`` for a broker URL, else :class:`TaskiqConfigError`."""
    scheme = url_scheme(url)
    if scheme in REDIS_SCHEMES:
        check_redis_url(url, "broker")
        return "redis"
    if scheme in RABBITMQ_SCHEMES:
        return "rabbitmq"
    raise TaskiqConfigError(
        f"Unsupported broker URL scheme '{scheme}://' in {redact_url(url)!r}. Use redis://, "
        "rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster://, "
        "rediss+cluster:// (Redis) or amqp://, amqps:// (RabbitMQ)."
    )


def check_backend_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL; the backend and key store are always Redis."""
    if url_scheme(url) not in REDIS_SCHEMES:
        raise TaskiqConfigError(
            f"The result backend must be Redis (redis://, rediss://, unix://, "
            f"redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://), got "
            f"{redact_url(url)!r}. Set 'backend' or {BACKEND_ENV} to a Redis URL."
        )
    check_redis_url(url, "backend")
    return url


def check_redis_url(url: str, what: str) -> None:
    """Raise :class:`TaskiqConfigError` if ``url`` is not a valid Redis URL of any form."""
    parse_redis_url(url, what)


@dataclasses.dataclass(frozen=True)
class TaskiqSettings:
    """Everything needed to talk to the broker, the result backend and the key store."""

    broker_url: str = DEFAULT_URL
    backend_url: str = DEFAULT_URL
    default_queue: str = DEFAULT_QUEUE
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    config_source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: HMAC-SHA256 key that signs every message (None: messages are not signed). Never shown.
    signing_key: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        broker_kind(self.broker_url)
        check_backend_url(self.backend_url)
        validate_queue_name(self.default_queue, "the 'default_queue' setting")
        check_config_source(self.config_source)
        if self.heartbeat_timeout <= 0:
            raise TaskiqConfigError(
                f"heartbeat_timeout must be positive, got {self.heartbeat_timeout}."
            )

    @property
    def broker_kind(self) -> str:
        """``"redis"`` or ``"rabbitmq"``."""
        return broker_kind(self.broker_url)

    def option(self, name: str, default: Any) -> Any:
        """A ``config_source`` option dagster-taskiq reads itself, with its default."""
        return self.config_source.get(name, default)

    @property
    def key_prefix(self) -> str:
        """Prefix of every Redis key we write.

        On a Redis Cluster the prefix is one hash tag (``{dagster_taskiq}``), unless it already
        holds one: every key of a deployment then lives in one hash slot, which every multi-key
        script (task record with the indexes, a worker's pop across its queues) needs.
        """
        prefix = str(self.option("key_prefix", "dagster_taskiq"))
        if self.on_cluster and "{" not in prefix:
            return "{" + prefix + "}"
        return prefix

    @property
    def on_cluster(self) -> bool:
        """Whether the broker or the backend is a Redis Cluster URL."""
        return any(url_scheme(u) in CLUSTER_SCHEMES for u in (self.broker_url, self.backend_url))

    @property
    def result_ttl(self) -> int:
        """Seconds to keep results and task records after a task ends."""
        return int(self.option("result_ttl", 86400))

    @property
    def connect_timeout(self) -> float:
        """Seconds to wait for a connection before failing."""
        return float(self.option("connect_timeout", 10.0))

    @property
    def max_message_bytes(self) -> int:
        """Largest message accepted at submit time."""
        return int(self.option("max_message_bytes", 4 * 1024 * 1024))

    @property
    def passthrough_options(self) -> dict[str, Any]:
        """``config_source`` entries that go to the broker connection unchanged."""
        return {k: v for k, v in self.config_source.items() if k not in KNOWN_SOURCE_OPTIONS}

    def __repr__(self) -> str:
        """The settings with credentials hidden: URL passwords, secret options, the signing key."""
        source = {
            name: "***" if _is_secret_option(name) else value
            for name, value in self.config_source.items()
        }
        return (
            f"TaskiqSettings(broker_url={redact_url(self.broker_url)!r}, "
            f"backend_url={redact_url(self.backend_url)!r}, "
            f"default_queue={self.default_queue!r}, heartbeat_timeout={self.heartbeat_timeout!r}, "
            f"config_source={source!r})"
        )

    def describe(self) -> str:
        """A one-line, credential-free description for logs and events."""
        return (
            f"broker {redact_url(self.broker_url)}, backend {redact_url(self.backend_url)}, "
            f"default queue '{self.default_queue}'"
        )


def _is_secret_option(name: str) -> bool:
    """Whether a ``config_source`` option holds a credential (never shown)."""
    lowered = name.lower()
    return any(word in lowered for word in ("password", "secret", "token"))


def shared_config_schema() -> dict[str, Field]:
    """Config fields shared by the executor and the run launcher (and the CLI's YAML file)."""
    return {
        "broker": Field(
            Noneable(StringSource),
            is_required=False,
            default_value=None,
            description=(
                f"Broker URL: redis://, rediss://, unix://, redis+sentinel://, "
                f"rediss+sentinel://, redis+cluster://, rediss+cluster:// or amqp://, amqps://. "
                f"Defaults to "
                f"{BROKER_ENV}, then the run launcher's broker, then {DEFAULT_URL}."
            ),
        ),
        "backend": Field(
            Noneable(StringSource),
            is_required=False,
            default_value=None,
            description=(
                f"Redis URL for results and the heartbeat key store. Defaults to {BACKEND_ENV}, "
                "then the run launcher's backend (while the broker is the launcher's), then the "
                "broker URL when it is Redis."
            ),
        ),
        "default_queue": Field(
            str,
            is_required=False,
            default_value=DEFAULT_QUEUE,
            description="Queue for work that carries no dagster-taskiq/queue tag.",
        ),
        "heartbeat_timeout": Field(
            float,
            is_required=False,
            default_value=DEFAULT_HEARTBEAT_TIMEOUT,
            description="Seconds a claimed or running task may go without a heartbeat before it "
            "is declared lost.",
        ),
        "signing_key": Field(
            Noneable(StringSource),
            is_required=False,
            default_value=None,
            description=(
                "HMAC-SHA256 key: the orchestrator signs every message with it, and workers "
                f"refuse unsigned or wrongly signed messages. Defaults to {SIGNING_KEY_ENV}. "
                "Use {env: VAR}: the key must not be written in the config."
            ),
        ),
        "config_source": Field(
            Shape(
                {
                    key: Field(ConfigAny, is_required=False, description=meaning)
                    for key, meaning in valid_source_options().items()
                }
            ),
            is_required=False,
            default_value={},
            description="Extra broker and connection options (an unknown key is an error): "
            + "; ".join(f"{k}: {v}" for k, v in valid_source_options().items())
            + ".",
        ),
    }


def executor_only_schema() -> dict[str, Field]:
    """Config fields that only the executor has."""
    return {
        "max_concurrent": Field(
            Noneable(IntSource),
            is_required=False,
            default_value=None,
            description="Maximum number of steps of one run in flight at once (default unlimited).",
        ),
        "poll_interval": Field(
            float,
            is_required=False,
            default_value=0.02,
            description="Seconds between two ticks of the orchestrator loop (event log poll).",
        ),
    }


def resolve_settings(
    config: Mapping[str, Any], fallback: "TaskiqSettings | None" = None
) -> TaskiqSettings:
    """Turn a validated config dict into :class:`TaskiqSettings`.

    Precedence for the URLs: the config value, the environment variable, ``fallback`` (the run
    launcher's settings), then the localhost default. The backend falls back to the broker URL
    when the broker is Redis.
    """
    broker = config.get("broker") or os.environ.get(BROKER_ENV)
    if not broker:
        broker = fallback.broker_url if fallback else DEFAULT_URL
    kind = broker_kind(broker)
    backend = config.get("backend") or os.environ.get(BACKEND_ENV)
    if not backend:
        if fallback is not None and fallback.broker_url == broker:
            backend = fallback.backend_url
        elif kind == "redis":
            backend = broker
        elif fallback is not None:
            backend = fallback.backend_url
        else:
            backend = DEFAULT_URL
    source = dict(config.get("config_source") or {})
    if fallback is not None and not source:
        source = dict(fallback.config_source)
    heartbeat = config.get("heartbeat_timeout")
    signing_key = config.get("signing_key") or os.environ.get(SIGNING_KEY_ENV)
    if not signing_key and fallback is not None:
        signing_key = fallback.signing_key
    return TaskiqSettings(
        broker_url=broker,
        backend_url=check_backend_url(backend),
        default_queue=str(config.get("default_queue") or DEFAULT_QUEUE),
        heartbeat_timeout=float(heartbeat if heartbeat is not None else DEFAULT_HEARTBEAT_TIMEOUT),
        config_source=source,
        signing_key=signing_key or None,
    )


def settings_to_config(settings: TaskiqSettings) -> dict[str, Any]:
    """The config dict that :func:`resolve_settings` turns back into ``settings``."""
    return {
        "broker": settings.broker_url,
        "backend": settings.backend_url,
        "default_queue": settings.default_queue,
        "heartbeat_timeout": settings.heartbeat_timeout,
        "config_source": dict(settings.config_source),
    }
