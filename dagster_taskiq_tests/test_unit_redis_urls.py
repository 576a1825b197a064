"""Redis URL forms (single server, Sentinel) and the client factory; no network."""

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from dagster_taskiq.config import TaskiqSettings, resolve_settings
from dagster_taskiq.errors import TaskiqConfigError
from dagster_taskiq.redis_clients import make_redis, make_sync_redis
from dagster_taskiq.urls import RedisTarget, parse_redis_url, redact_url


def test_single_server_urls_pass_through() -> None:
    for url in ("redis://h:6379/2", "rediss://u:p@h:6380/0", "unix:///tmp/r.sock?db=1"):
        target = parse_redis_url(url)
        assert (target.mode, target.url) == ("single", url)
    assert parse_redis_url("rediss://h:6380/0").tls and not parse_redis_url("redis://h/0").tls


def test_sentinel_url_with_everything() -> None:
    target = parse_redis_url(
        "rediss+sentinel://app:s%40cret@10.0.0.1:26379,sentinel-b:26380,[::1]:26381/mymaster/3"
    )
    assert target == RedisTarget(
        mode="sentinel",
        url=target.url,
        hosts=(("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381)),
        master="mymaster",
        db=3,
        username="app",
        password="s@cret",
        tls=True,
    )
    assert "s@cret" not in repr(target) and "s@cret" not in target.describe()
    assert target.describe() == (
        "master 'mymaster' (db 3) via sentinels 10.0.0.1:26379,sentinel-b:26380,[::1]:26381"
    )


@pytest.mark.parametrize(
    ("url", "username", "password", "db", "hosts"),
    [
        ("redis+sentinel://h1:1/m", None, None, 0, (("h1", 1),)),
        ("redis+sentinel://:pw@h1/m/", None, "pw", 0, (("h1", 26379),)),
        ("REDIS+SENTINEL://user@h1:5,h2/m/0", "user", None, 0, (("h1", 5), ("h2", 26379))),
        ("redis+sentinel://u:p:q@h1:5/m/15", "u", "p:q", 15, (("h1", 5),)),
    ],
)
def test_sentinel_url_variants(
    url: str,
    username: str | None,
    password: str | None,
    db: int,
    hosts: tuple[tuple[str, int], ...],
) -> None:
    target = parse_redis_url(url)
    assert (target.mode, target.master, target.tls) == ("sentinel", "m", False)
    assert (target.username, target.password, target.db, target.hosts) == (
        username,
        password,
        db,
        hosts,
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://u:hunter2@h1:26379", "master name is missing"),
        ("redis+sentinel://u:hunter2@h1:26379/", "master name is missing"),
        ("redis+sentinel://u:hunter2@h1:26379/m/x", "database 'x' is not a number"),
        ("redis+sentinel://u:hunter2@h1:26379/m/0/extra", "more than /MASTER_NAME/DB"),
        ("redis+sentinel://u:hunter2@h1:port/m", "port 'port' of host 'h1'"),
        ("redis+sentinel://u:hunter2@h1:70000/m", "port '70000'"),
        ("redis+sentinel://u:hunter2@h1:1,,h2:2/m", "a host is empty"),
        ("redis+sentinel://u:hunter2@/m", "a host is empty"),
        ("redis+sentinel://u:hunter2@::1:26379/m", "more than one ':'"),
        ("redis+sentinel://u:hunter2@[::1/m", "is not [ipv6]"),
        ("redis+sentinel://u:hunter2@h1/m?ssl_cert_reqs=none", "takes no query"),
    ],
)
def test_bad_sentinel_urls_name_the_form_and_hide_the_password(url: str, reason: str) -> None:
    with pytest.raises(TaskiqConfigError) as info:
        resolve_settings({"broker": url})
    message = str(info.value)
    assert reason in message, message
    assert "The broker URL" in message and "not a valid Sentinel URL" in message
    assert "redis+sentinel://[user:password@]host:port[,host:port...]/MASTER_NAME[/DB]" in message
    assert "hunter2" not in message


def test_not_a_redis_url_names_every_form() -> None:
    with pytest.raises(TaskiqConfigError) as info:
        parse_redis_url("http://u:hunter2@h/", "backend")
    message = str(info.value)
    assert "The backend URL" in message and "hunter2" not in message
    assert "redis://" in message and "redis+sentinel://" in message


def test_settings_accept_sentinel_urls_and_redact_them() -> None:
    url = "redis+sentinel://:hunter2@127.0.0.1:26379,127.0.0.1:26380/mymaster/1"
    settings = resolve_settings({"broker": url})
    assert settings.broker_kind == "redis" and settings.backend_url == url
    assert "hunter2" not in settings.describe()
    assert redact_url(url) == "redis+sentinel://:***@127.0.0.1:26379,127.0.0.1:26380/mymaster/1"


def test_factory_builds_a_sentinel_managed_client() -> None:
    """The async client asks the sentinels for the master; credentials, db and TLS go to the
    master's connections, the sentinels get their own auth from config_source."""
    settings = TaskiqSettings(
        broker_url="rediss+sentinel://app:pw@127.0.0.1:1,127.0.0.1:2/mymaster/4",
        backend_url="rediss+sentinel://app:pw@127.0.0.1:1,127.0.0.1:2/mymaster/4",
        config_source={"sentinel_password": "sentinel-pw", "ssl_cert_reqs": "none"},
    )
    client = make_redis(settings.broker_url, settings)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (4, "app", "pw")
    assert kwargs["ssl_cert_reqs"] == "none" and "sentinel_password" not in kwargs
    assert "SSL" in pool.connection_class.__name__
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
    sentinel_kwargs = sentinels[0].connection_pool.connection_kwargs
    assert sentinel_kwargs["password"] == "sentinel-pw"
    assert sentinel_kwargs["ssl_cert_reqs"] == "none"


def test_sync_factory_builds_a_sentinel_managed_client() -> None:
    client = make_sync_redis("redis+sentinel://:pw@127.0.0.1:1/mymaster/2", timeout=0.5)
    pool = client.connection_pool
    assert pool.service_name == "mymaster"  # type: ignore[attr-defined]
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (2, "pw")
    client.close()


def test_cluster_urls() -> None:
    target = parse_redis_url("rediss+cluster://app:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002/0")
    assert (target.mode, target.tls, target.username, target.password) == (
        "cluster",
        True,
        "app",
        "pw",
    )
    assert target.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert "pw" not in target.describe()
    assert parse_redis_url("redis+cluster://h:7000").hosts == (("h", 7000),)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster://u:hunter2@h:7000/1", "database 0 only"),
        ("redis+cluster://u:hunter2@h:7000,/", "a host is empty"),
        ("redis+cluster://u:hunter2@h:x", "port 'x'"),
        ("redis+cluster://u:hunter2@h:7000?ssl=true", "takes no query"),
    ],
)
def test_bad_cluster_urls_name_the_form(url: str, reason: str) -> None:
    with pytest.raises(TaskiqConfigError) as info:
        resolve_settings({"backend": url})
    message = str(info.value)
    assert reason in message and "not a valid Redis Cluster URL" in message, message
    assert "redis+cluster://[user:password@]host:port[,host:port...]" in message
    assert "hunter2" not in message


def test_cluster_settings_put_every_key_in_one_hash_slot() -> None:
    url = "redis+cluster://127.0.0.1:7000"
    assert resolve_settings({"broker": url}).key_prefix == "{dagster_taskiq}"
    tagged = resolve_settings({"broker": url, "config_source": {"key_prefix": "a{b}"}})
    assert tagged.key_prefix == "a{b}"
    plain = resolve_settings({"broker": "redis://h/0", "config_source": {"key_prefix": "p"}})
    assert plain.key_prefix == "p"


def test_factory_builds_a_cluster_client() -> None:
    settings = resolve_settings(
        {"broker": "redis+cluster://app:pw@127.0.0.1:1,127.0.0.1:2", "config_source": {}}
    )
    client = make_redis(settings.broker_url, settings)
    assert isinstance(client, RedisCluster)
    ports = sorted(node.port for node in client.nodes_manager.startup_nodes.values())
    assert ports == [1, 2]
    assert client.connection_kwargs["password"] == "pw"
    assert client.connection_kwargs["username"] == "app"
