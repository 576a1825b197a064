"""The one place that builds Redis clients, for every URL form (:mod:`dagster_taskiq.urls`).

The broker, the result backend, the key store, the metrics exporter and the CLI all get their
client from :func:`make_redis`; local commands that only probe a server use
:func:`make_sync_redis`. A Sentinel URL gives a client whose connections ask the sentinels for
the current master each time they (re)connect, so after a failover the next reconnect (driven by
the callers' retry policy, :mod:`dagster_taskiq.lifecycle.retry`) reaches the new master. A
Cluster URL gives a :class:`~redis.asyncio.cluster.RedisCluster`, which routes each command (and
each script, whose keys share one hash slot, see :mod:`dagster_taskiq.lifecycle.keys`) to the
node that owns its slot.
"""

from typing import Any, cast

import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from dagster_taskiq.config import REDIS_CONNECTION_OPTIONS, TaskiqSettings
from dagster_taskiq.urls import RedisTarget, parse_redis_url

#: Seconds a Redis command may wait for its reply before it fails.
SOCKET_TIMEOUT = 5.0

#: ``config_source`` keys that configure the sentinels' own connections, not the master's.
_SENTINEL_AUTH = {"sentinel_username": "username", "sentinel_password": "password"}
_SSL_OPTION_PREFIX = "ssl_"


def _passthrough(settings: TaskiqSettings) -> dict[str, Any]:
    """``config_source`` options for redis-py connections to the data nodes."""
    return {
        key: value
        for key, value in settings.passthrough_options.items()
        if key in REDIS_CONNECTION_OPTIONS and key not in _SENTINEL_AUTH
    }


def connection_options(settings: TaskiqSettings, target: RedisTarget) -> dict[str, Any]:
    """redis-py connection keywords: our timeouts, keepalive, retries and ``config_source``."""
    # TCP keepalive is a TCP option: redis-py's unix socket connections reject it.
    keepalive = {} if target.url.lower().startswith("unix:") else {"socket_keepalive": True}
    return {
        "socket_connect_timeout": min(settings.connect_timeout, 5.0),
        # A server that stops answering (paused, partitioned) must fail commands instead of
        # hanging them; our callers retry with backoff and log. Longer than any blocking pull.
        "socket_timeout": SOCKET_TIMEOUT,
        **keepalive,
        "health_check_interval": 15,
        # Refused or reset connections are retried at once, a few times; a timed-out command is
        # not (each retry would wait another socket_timeout): it goes to the caller's backoff.
        "retry": Retry(
            ExponentialBackoff(cap=2.0, base=0.1),
            retries=3,
            supported_errors=(RedisConnectionError,),  # redis-py's default adds timeouts
        ),
        "retry_on_error": [RedisConnectionError],
        **_passthrough(settings),
    }


def _sentinel_options(settings: TaskiqSettings, target: RedisTarget) -> dict[str, Any]:
    """Keywords of the connections to the sentinels themselves: timeouts, TLS, their auth."""
    source = settings.passthrough_options
    options: dict[str, Any] = {
        "socket_connect_timeout": min(settings.connect_timeout, 5.0),
        "socket_timeout": SOCKET_TIMEOUT,
    }
    if target.tls:
        options["ssl"] = True
        options.update({k: v for k, v in source.items() if k.startswith(_SSL_OPTION_PREFIX)})
    options.update({name: source[key] for key, name in _SENTINEL_AUTH.items() if key in source})
    return options


def make_redis(url: str, settings: TaskiqSettings) -> Redis:
    """A redis-py asyncio client for any Redis URL form, with our timeouts, retries and TLS."""
    target = parse_redis_url(url)
    options = connection_options(settings, target)
    if target.mode == "single":
        return Redis.from_url(url, **options)
    if target.mode == "cluster":
        return _make_cluster(target, options)
    assert target.master is not None  # a sentinel target always names its master
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=_sentinel_options(settings, target))
    auth = {"username": target.username, "password": target.password}
    # Options given in config_source win over the URL's credentials, as for single servers.
    master_options = {**auth, **options, "db": target.db}
    if target.tls:
        master_options["ssl"] = True
    return sentinel.master_for(target.master, redis_class=Redis, **master_options)


def _make_cluster(target: RedisTarget, options: dict[str, Any]) -> Redis:
    """A cluster client. It answers the same commands as :class:`Redis` for keys in one slot
    (the only kind we use), so callers keep one type."""
    cluster_options: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        **options,
    }
    if target.tls:
        cluster_options["ssl"] = True
    nodes = [ClusterNode(host, port) for host, port in target.hosts]
    cluster = RedisCluster(startup_nodes=nodes, **cluster_options)
    return cast(Redis, cluster)


def make_sync_redis(url: str, *, timeout: float) -> redis.Redis:
    """A blocking redis-py client for any Redis URL form, for quick probes (``PING``)."""
    target = parse_redis_url(url)
    options: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    if target.mode == "single":
        return redis.Redis.from_url(url, **options)
    if target.mode == "cluster":
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.hosts]
        cluster = redis.RedisCluster(
            startup_nodes=nodes,
            username=target.username,
            password=target.password,
            ssl=target.tls,
            **options,
        )
        return cast(redis.Redis, cluster)
    assert target.master is not None
    if target.tls:
        options["ssl"] = True
    sentinel = redis.Sentinel(list(target.hosts), sentinel_kwargs=dict(options))
    master_options: dict[str, Any] = {
        **options,
        "db": target.db,
        "username": target.username,
        "password": target.password,
    }
    return sentinel.master_for(target.master, **master_options)
