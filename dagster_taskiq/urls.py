"""Broker and Redis URLs: what a Redis URL points at, and how to show any URL without secrets.

Three Redis URL forms are understood, all parsed here and nowhere else:

* one server: ``redis://``, ``rediss://`` (TLS) and ``unix://``, in redis-py's own format;
* Redis behind Sentinel: ``redis+sentinel://[user:password@]host:port[,host:port...]/MASTER[/DB]``
  (``rediss+sentinel://`` for TLS). The hosts are the sentinels; the credentials, database and
  TLS apply to the master the sentinels name;
* Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://``
  for TLS). The hosts are start-up nodes; the cluster has database 0 only.
"""

import dataclasses
from collections.abc import Callable
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from dagster_taskiq.errors import TaskiqConfigError

#: Schemes of a single Redis server (redis-py's URL format).
SINGLE_SCHEMES = frozenset({"redis", "rediss", "unix"})
#: Schemes of Redis behind Sentinel.
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
#: Schemes of a Redis Cluster.
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
#: Every Redis scheme we accept for the broker, the result backend and the key store.
REDIS_SCHEMES = SINGLE_SCHEMES | SENTINEL_SCHEMES | CLUSTER_SCHEMES

#: Port of a sentinel written without one.
DEFAULT_SENTINEL_PORT = 26379
#: Port of a cluster node written without one.
DEFAULT_CLUSTER_PORT = 6379

SENTINEL_FORM = (
    "redis+sentinel://[user:password@]host:port[,host:port...]/MASTER_NAME[/DB] "
    "(rediss+sentinel:// for TLS)"
)
CLUSTER_FORM = (
    "redis+cluster://[user:password@]host:port[,host:port...] (rediss+cluster:// for TLS)"
)
SINGLE_FORM = "redis://[[user]:password@]host[:port][/db], rediss://... or unix:///path?db=N"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe for logs, events and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    # Keep the host part exactly as written (IPv6 brackets, port, several hosts); replace only
    # the password.
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def url_scheme(url: str) -> str:
    """The lower-cased scheme of ``url`` (empty if it has none)."""
    return url.partition("://")[0].lower() if "://" in url else ""


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL points at.

    ``mode`` is ``"single"`` (``url`` is handed to redis-py as it is), ``"sentinel"`` (the
    ``hosts`` are sentinels that name the master ``master``) or ``"cluster"`` (the ``hosts`` are
    start-up nodes of a Redis Cluster).
    """

    mode: Literal["single", "sentinel", "cluster"]
    url: str = dataclasses.field(repr=False)
    hosts: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: bool = False

    def describe(self) -> str:
        """A credential-free description for logs and errors."""
        if self.mode == "single":
            return redact_url(self.url)
        hosts = ",".join(_format_host(host, port) for host, port in self.hosts)
        if self.mode == "cluster":
            return f"Redis Cluster via {hosts}"
        return f"master '{self.master}' (db {self.db}) via sentinels {hosts}"


def parse_redis_url(url: str, what: str = "Redis") -> RedisTarget:
    """Parse any Redis URL form; :class:`TaskiqConfigError` naming the form if it is invalid.

    ``what`` names the setting in error messages (``"broker"``, ``"backend"``).
    """
    scheme = url_scheme(url)
    if scheme in SINGLE_SCHEMES:
        _check_single(url, scheme, what)
        return RedisTarget(mode="single", url=url, tls=scheme == "rediss")
    if scheme in SENTINEL_SCHEMES:
        return _parse_sentinel(url, scheme, what)
    if scheme in CLUSTER_SCHEMES:
        return _parse_cluster(url, scheme, what)
    raise TaskiqConfigError(
        f"The {what} URL {redact_url(url)!r} is not a Redis URL. Use {SINGLE_FORM}, "
        f"{SENTINEL_FORM}, or {CLUSTER_FORM}."
    )


def _check_single(url: str, scheme: str, what: str) -> None:
    from redis.connection import parse_url

    try:
        parse_url(scheme + url[len(scheme) :])
    except ValueError as exc:
        raise TaskiqConfigError(
            f"The {what} URL {redact_url(url)!r} is malformed: {exc} Fix the '{what}' setting "
            f"(the form is {SINGLE_FORM})."
        ) from None


def _error_builder(url: str, what: str, kind: str, form: str) -> Callable[[str], TaskiqConfigError]:
    def bad(reason: str) -> TaskiqConfigError:
        return TaskiqConfigError(
            f"The {what} URL {redact_url(url)!r} is not a valid {kind} URL: {reason}. Fix the "
            f"'{what}' setting; the form is {form}."
        )

    return bad


def _split(
    url: str, scheme: str, default_port: int, bad: Callable[[str], TaskiqConfigError]
) -> tuple[str | None, str | None, tuple[tuple[str, int], ...], bool, str]:
    """(username, password, hosts, whether a path follows, the path) of a multi-host URL."""
    rest = url[len(scheme) + 3 :]
    if "?" in rest or "#" in rest:
        raise bad("it takes no query or fragment (TLS options go in config_source)")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = tuple(_parse_host(part, default_port, bad) for part in hostlist.split(","))
    return username, password, hosts, bool(slash), path


def _parse_cluster(url: str, scheme: str, what: str) -> RedisTarget:
    bad = _error_builder(url, what, "Redis Cluster", CLUSTER_FORM)
    username, password, hosts, _, path = _split(url, scheme, DEFAULT_CLUSTER_PORT, bad)
    if path.strip("/") not in ("", "0"):
        raise bad(f"a cluster has database 0 only, not '/{path}'")
    return RedisTarget(
        mode="cluster",
        url=url,
        hosts=hosts,
        username=username,
        password=password,
        tls=scheme.startswith("rediss"),
    )


def _parse_sentinel(url: str, scheme: str, what: str) -> RedisTarget:
    bad = _error_builder(url, what, "Sentinel", SENTINEL_FORM)
    username, password, hosts, slash, path = _split(url, scheme, DEFAULT_SENTINEL_PORT, bad)
    segments = path.strip("/").split("/") if slash and path.strip("/") else []
    if not segments:
        raise bad("the master name is missing after the hosts")
    if len(segments) > 2:
        raise bad(f"the path '/{path}' has more than /MASTER_NAME/DB")
    master = unquote(segments[0])
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise bad(f"the database '{segments[1]}' is not a number")
        db = int(segments[1])
    return RedisTarget(
        mode="sentinel",
        url=url,
        hosts=hosts,
        master=master,
        db=db,
        username=username,
        password=password,
        tls=scheme.startswith("rediss"),
    )


def _parse_host(
    text: str, default_port: int, bad: Callable[[str], TaskiqConfigError]
) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, close, tail = text[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise bad(f"the host '{text}' is not [ipv6] or [ipv6]:port")
        port_text = tail[1:]
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:
            raise bad(f"the host '{text}' has more than one ':' (write IPv6 hosts as [addr]:port)")
    if not host:
        raise bad("a host is empty (hosts are separated by single commas)")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise bad(f"the port '{port_text}' of host '{host}' is not a number from 1 to 65535")
    return host, int(port_text)


def _format_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
