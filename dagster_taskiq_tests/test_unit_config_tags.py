"""Unit tests (no network): settings resolution, URL redaction and tag parsing."""

import warnings

import pytest

from dagster_taskiq.config import (
    BACKEND_ENV,
    BROKER_ENV,
    DEFAULT_URL,
    TaskiqSettings,
    broker_kind,
    check_backend_url,
    redact_url,
    resolve_settings,
    settings_to_config,
)
from dagster_taskiq.errors import InvalidTagError, TaskiqConfigError
from dagster_taskiq.tags import (
    CeleryTagWarning,
    Routing,
    parse_priority,
    queue_from_tags,
    run_priority_from_tags,
    run_routing,
    step_routing,
)

RABBIT = "amqp://guest:guest@rabbit:5672/"
LAUNCHER = TaskiqSettings(
    broker_url="redis://launcher-host:6379/1",
    backend_url="redis://launcher-backend:6379/2",
    default_queue="launcher-queue",
    heartbeat_timeout=12.0,
    config_source={"key_prefix": "from-launcher"},
)


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the DAGSTER_TASKIQ_* variables."""
    monkeypatch.delenv(BROKER_ENV, raising=False)
    monkeypatch.delenv(BACKEND_ENV, raising=False)


# -- settings resolution ---------------------------------------------------------------------


def test_defaults_without_config_env_or_launcher() -> None:
    settings = resolve_settings({})
    assert settings == TaskiqSettings()
    assert (settings.broker_url, settings.backend_url) == (DEFAULT_URL, DEFAULT_URL)
    assert (settings.default_queue, settings.heartbeat_timeout) == ("dagster", 30.0)
    assert settings.broker_kind == "redis"


def test_env_vars_are_used_when_config_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKER_ENV, RABBIT)
    monkeypatch.setenv(BACKEND_ENV, "redis://env-backend:6379/3")
    settings = resolve_settings({}, LAUNCHER)
    assert settings.broker_url == RABBIT
    assert settings.backend_url == "redis://env-backend:6379/3"
    assert settings.broker_kind == "rabbitmq"


def test_explicit_config_beats_env_and_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKER_ENV, RABBIT)
    monkeypatch.setenv(BACKEND_ENV, "redis://env-backend:6379/3")
    settings = resolve_settings(
        {
            "broker": "redis://config-broker:6379/0",
            "backend": "redis://config-backend:6379/0",
            "default_queue": "mine",
            "heartbeat_timeout": 4.5,
            "config_source": {"key_prefix": "own"},
        },
        LAUNCHER,
    )
    assert settings == TaskiqSettings(
        broker_url="redis://config-broker:6379/0",
        backend_url="redis://config-backend:6379/0",
        default_queue="mine",
        heartbeat_timeout=4.5,
        config_source={"key_prefix": "own"},
    )


def test_launcher_is_the_fallback_for_urls_and_broker_options() -> None:
    settings = resolve_settings({}, LAUNCHER)
    assert settings.broker_url == LAUNCHER.broker_url
    assert settings.backend_url == LAUNCHER.backend_url
    assert settings.config_source == {"key_prefix": "from-launcher"}
    # The queue and timeout are executor settings with their own defaults.
    assert (settings.default_queue, settings.heartbeat_timeout) == ("dagster", 30.0)


def test_env_broker_with_launcher_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A RabbitMQ broker from the environment keeps the launcher's Redis backend."""
    monkeypatch.setenv(BROKER_ENV, RABBIT)
    assert resolve_settings({}, LAUNCHER).backend_url == LAUNCHER.backend_url


def test_backend_defaults_to_a_redis_broker() -> None:
    settings = resolve_settings({"broker": "rediss://:pw@tls-host:6380/4"})
    assert settings.backend_url == "rediss://:pw@tls-host:6380/4"
    # A Redis broker of its own also brings its own backend, even with a launcher configured:
    # tasks and their records must live where the workers (started with the same config) look.
    settings = resolve_settings({"broker": "redis://other:6379/0"}, LAUNCHER)
    assert settings.backend_url == "redis://other:6379/0"


def test_backend_of_a_rabbitmq_broker_without_launcher_is_local_redis() -> None:
    assert resolve_settings({"broker": RABBIT}).backend_url == DEFAULT_URL


def test_settings_round_trip_through_config() -> None:
    settings = resolve_settings(
        {"broker": RABBIT, "backend": "redis://b:6379/0", "config_source": {"qos": 1}}
    )
    assert resolve_settings(settings_to_config(settings)) == settings


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://h:6379/0", "redis"),
        ("REDIS://h:6379/0", "redis"),
        ("rediss://h:6380/0", "redis"),
        ("unix:///var/run/redis.sock?db=1", "redis"),
        ("amqp://u:p@h:5672/vh", "rabbitmq"),
        ("amqps://u:p@h:5671/", "rabbitmq"),
    ],
)
def test_broker_kind_by_scheme(url: str, kind: str) -> None:
    assert broker_kind(url) == kind


@pytest.mark.parametrize(
    "url", ["kafka://u:hunter2@h:9092", "sqs://h", "localhost:6379", "http://u:hunter2@h/"]
)
def test_unknown_scheme_is_a_config_error_without_the_password(url: str) -> None:
    with pytest.raises(TaskiqConfigError) as info:
        resolve_settings({"broker": url})
    message = str(info.value)
    assert "Unsupported broker URL scheme" in message and "hunter2" not in message
    assert "redis://" in message and "amqp://" in message


@pytest.mark.parametrize(
    ("field", "url"),
    [("broker", "unix:///tmp/r.sock?db=0,"), ("backend", "redis://u:hunter2@h:6379/0?db=zero")],
)
def test_malformed_redis_url_is_a_config_error_without_the_password(field: str, url: str) -> None:
    with pytest.raises(TaskiqConfigError) as info:
        resolve_settings({field: url})
    message = str(info.value)
    assert f"The {field} URL" in message and "is malformed" in message and "'db'" in message
    assert "hunter2" not in message


def test_backend_must_be_redis() -> None:
    with pytest.raises(
        TaskiqConfigError, match=r"result backend must be Redis.*'amqp://u:\*\*\*@h"
    ):
        resolve_settings({"broker": RABBIT, "backend": "amqp://u:hunter2@h/"})
    assert check_backend_url("unix:///tmp/r.sock") == "unix:///tmp/r.sock"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"heartbeat_timeout": 0}, "heartbeat_timeout must be positive"),
        ({"heartbeat_timeout": -3}, "heartbeat_timeout must be positive"),
        ({"default_queue": "  "}, "Invalid queue name"),
        ({"default_queue": "bad\nname"}, "Invalid queue name"),
    ],
)
def test_invalid_settings_are_refused(fields: dict[str, object], match: str) -> None:
    with pytest.raises((TaskiqConfigError, InvalidTagError), match=match):
        TaskiqSettings(**fields)  # type: ignore[arg-type]


def test_known_options_and_passthrough() -> None:
    settings = TaskiqSettings(
        config_source={
            "key_prefix": "p",
            "result_ttl": 60,
            "connect_timeout": 2,
            "ssl_ca_certs": "x",
        }
    )
    assert (settings.key_prefix, settings.result_ttl, settings.connect_timeout) == ("p", 60, 2.0)
    assert settings.max_message_bytes == 4 * 1024 * 1024
    assert settings.passthrough_options == {"ssl_ca_certs": "x"}
    assert TaskiqSettings().key_prefix == "dagster_taskiq"


def test_describe_never_shows_passwords() -> None:
    settings = TaskiqSettings(
        broker_url="amqp://u:hunter2@h:5672/", backend_url="redis://:hunter2@h:6379/0"
    )
    assert "hunter2" not in settings.describe()
    assert "amqp://u:***@h:5672/" in settings.describe()


# -- redact_url -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
        ("amqps://user:p%40ss@h/vhost?heartbeat=10", "amqps://user:***@h/vhost?heartbeat=10"),
        (
            "rediss://user:pw@h:6380/1?ssl_cert_reqs=none",
            "rediss://user:***@h:6380/1?ssl_cert_reqs=none",
        ),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("amqp://u:pw@[::1]:5672/", "amqp://u:***@[::1]:5672/"),
        ("redis://:pw@h/0", "redis://:***@h/0"),
        ("amqp://u:p:w@h/", "amqp://u:***@h/"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_of_an_unparseable_url() -> None:
    assert redact_url("redis://u:pw@[::1:6379/0") == "<unparseable url>"


# -- tags -------------------------------------------------------------------------------------


def test_step_routing_defaults() -> None:
    assert step_routing({}, {}, "dq", "step 'a'") == Routing("dq", 5)
    assert run_routing({}, "dq", "run r") == Routing("dq", 0)


def test_step_priority_adds_the_run_priority() -> None:
    step_tags = {"dagster-taskiq/queue": " gpu ", "dagster-taskiq/priority": "7"}
    run_tags = {"dagster-taskiq/run_priority": "-2"}
    assert step_routing(step_tags, run_tags, "dq", "step 'a'") == Routing("gpu", 5)
    assert run_routing({"dagster-taskiq/queue": "runs", **run_tags}, "dq", "run r") == Routing(
        "runs", -2
    )


@pytest.mark.parametrize("value", ["high", "", "7.5", "1e3", None])
def test_non_integer_priority_names_tag_and_place(value: object) -> None:
    with pytest.raises(InvalidTagError) as info:
        parse_priority(value, "dagster-taskiq/priority", "step 'a' of run r")
    message = str(info.value)
    assert "Tag 'dagster-taskiq/priority' on step 'a' of run r must be an integer" in message
    assert "tags={'dagster-taskiq/priority': '7'}" in message


def test_priority_bounds() -> None:
    assert parse_priority(" 1000000 ", "t", "w") == 1_000_000
    assert parse_priority("-1000000", "t", "w") == -1_000_000
    with pytest.raises(InvalidTagError, match="between"):
        parse_priority("1000001", "t", "w")


def test_bad_queue_tag() -> None:
    with pytest.raises(InvalidTagError, match="Invalid queue name '' on step 'a'"):
        queue_from_tags({"dagster-taskiq/queue": ""}, "dq", "step 'a'")


def _routing_warnings(step_tags: dict[str, str], run_tags: dict[str, str], times: int) -> list[str]:
    """Route a step ``times`` times under Python's default warning filter; return the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(times):
            step_routing(step_tags, run_tags, "dq", "step 'a'")
    return [str(w.message) for w in caught if issubclass(w.category, CeleryTagWarning)]


def test_celery_tags_are_honoured_with_a_one_time_warning() -> None:
    step_tags = {"dagster-celery/queue": "legacy", "dagster-celery/priority": "8"}
    run_tags = {"dagster-celery/run_priority": "1"}
    with pytest.warns(CeleryTagWarning):
        assert step_routing(step_tags, run_tags, "dq", "step 'a'") == Routing("legacy", 9)
    messages = _routing_warnings(step_tags, run_tags, times=5)
    # One warning per legacy tag, however many steps are routed.
    assert len(messages) == 3
    for tag in ("queue", "priority", "run_priority"):
        assert any(
            f"'dagster-celery/{tag}'; rename it to 'dagster-taskiq/{tag}'" in m for m in messages
        )


def test_taskiq_tags_win_over_celery_tags_silently() -> None:
    step_tags = {
        "dagster-taskiq/queue": "new",
        "dagster-celery/queue": "old",
        "dagster-taskiq/priority": "2",
        "dagster-celery/priority": "9",
    }
    run_tags = {"dagster-taskiq/run_priority": "0", "dagster-celery/run_priority": "5"}
    assert step_routing(step_tags, run_tags, "dq", "step 'a'") == Routing("new", 2)
    assert _routing_warnings(step_tags, run_tags, times=2) == []


def test_bad_celery_priority_names_the_celery_tag() -> None:
    with pytest.warns(CeleryTagWarning), pytest.raises(InvalidTagError) as info:
        run_priority_from_tags({"dagster-celery/run_priority": "soon"}, "step 'a' of run r")
    assert "Tag 'dagster-celery/run_priority' on step 'a' of run r" in str(info.value)


def test_settings_repr_hides_every_credential() -> None:
    """A settings object that ends up in a log, a traceback or a debugger shows no secret."""
    from dagster_taskiq.config import TaskiqSettings

    settings = TaskiqSettings(
        broker_url="redis://:hunter2@127.0.0.1:6379/0",
        backend_url="redis+sentinel://user:s3cret@127.0.0.1:26379,127.0.0.1:26380/main",
        config_source={"password": "pw-one", "sentinel_password": "pw-two", "key_prefix": "p"},
        signing_key="signing-secret",
    )
    shown = repr(settings) + str(settings)
    for secret in ("hunter2", "s3cret", "pw-one", "pw-two", "signing-secret"):
        assert secret not in shown
    assert "127.0.0.1:6379/0" in shown and "'key_prefix': 'p'" in shown
