"""Unit tests of ``run lanes`` (RabbitMQ priority lanes against classic queues), no network:
the executor variants' configs, the rabbitmqctl counters and the lanes tables."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from benchmarks.__main__ import _parser
from benchmarks.env import EXECUTORS, BenchEnv
from benchmarks.lanes import (
    CLASSIC_EXECUTOR,
    LANE_BROKER_ROW,
    LANE_ROW,
    LANE_VARIANTS,
    LANES_EXECUTORS,
    BrokerProbe,
    RabbitCounter,
    expected_queue_count,
    format_lanes,
    lane_rows,
    lanes_of,
    named_url,
    owns_queue,
    pull_round_trips,
    worker_connection_name,
)
from benchmarks.report import summarize
from benchmarks.scenarios import MODES
from dagster_taskiq.brokers.lanes import QueueLayout


def test_lanes_mode_compares_classic_with_quorum_lanes() -> None:
    mode = MODES["lanes"]
    assert mode.executors == LANES_EXECUTORS == (CLASSIC_EXECUTOR, *LANE_VARIANTS)
    assert set(mode.scenarios) == {"chain_20", "fanout_100"}
    assert [lanes_of(e) for e in LANES_EXECUTORS] == [0, 1, 3, 5]
    assert all(EXECUTORS[e].broker == "rabbitmq" for e in LANES_EXECUTORS)
    args = _parser().parse_args(["run", "lanes", "--executors", ",".join(LANE_VARIANTS)])
    assert args.mode == "lanes" and args.executors == list(LANE_VARIANTS)


@pytest.fixture
def env() -> Iterator[BenchEnv]:
    bench = BenchEnv(list(LANES_EXECUTORS), redis_url="redis://127.0.0.1:6379/5")
    try:
        yield bench
    finally:
        shutil.rmtree(bench.root, ignore_errors=True)  # nothing was started: no stop()


@pytest.mark.parametrize("executor", LANES_EXECUTORS)
def test_variant_configs_have_the_queue_type_and_lanes(env: BenchEnv, executor: str) -> None:
    setup = env._prepare(EXECUTORS[executor])
    lanes = lanes_of(executor)
    worker = yaml.safe_load(Path(setup.home / "worker.yaml").read_text())["execution"]["config"]
    run = setup.run_config["execution"]["config"]
    launcher = yaml.safe_load(Path(setup.home / "dagster.yaml").read_text())["run_launcher"]
    for config in (worker, run, launcher["config"]):
        source = config["config_source"]
        if lanes:
            assert source["queue_type"] == "quorum"
            assert source["priority_lanes"] == lanes
        else:
            assert "queue_type" not in source and "priority_lanes" not in source
        assert config["broker"].startswith("amqp://")
    # Only the workers' connections carry the name the broker probe looks for.
    assert parse_qs(urlsplit(worker["broker"]).query)["name"] == [
        worker_connection_name(env.uid, executor)
    ]
    assert "name" not in parse_qs(urlsplit(run["broker"]).query)
    assert len(setup.workers) == 2
    env.setups[executor] = setup
    name, queue, exchange = env.rabbit_executors()[executor]
    assert setup.settings is not None
    assert name == worker_connection_name(env.uid, executor)
    assert queue == setup.settings.default_queue
    assert exchange == run["config_source"]["exchange"]


@pytest.mark.parametrize("lanes", [1, 3, 5])
def test_counts_by_code_path_follow_the_layout(lanes: int) -> None:
    layout = QueueLayout(exchange="x", queue_type="quorum", lanes=lanes)
    assert expected_queue_count(lanes) == len(layout.physical_queues("q")) + 1
    assert expected_queue_count(0) == len(QueueLayout(exchange="x").physical_queues("q")) == 1
    trips = pull_round_trips(lanes)
    # basic.get per lane (only with two lanes or more), then a consumer per lane + dead letters.
    assert trips["after_delivery"] == lanes + 1
    assert trips["before_wait"] == (lanes if lanes > 1 else 0) + lanes + 1
    assert pull_round_trips(0) == {"before_wait": 1, "after_delivery": 1}


def test_named_url_and_queue_ownership() -> None:
    url = named_url("amqp://guest:guest@127.0.0.1:5672/?heartbeat=30&name=old", "w")
    assert parse_qs(urlsplit(url).query) == {"heartbeat": ["30"], "name": ["w"]}
    assert owns_queue("b-x-taskiq_rabbitmq", "b-x-taskiq_rabbitmq", "dt-b-x-taskiq_rabbitmq")
    assert owns_queue("b-x-q3.p2", "b-x-q3", "dt-b-x-q3")
    assert owns_queue("dt-b-x-q3.dead-letters", "b-x-q3", "dt-b-x-q3")
    # The classic executor's name is a prefix of the variants': their queues are not its own.
    assert not owns_queue(
        "b-x-taskiq_rabbitmq_quorum3.p0", "b-x-taskiq_rabbitmq", "dt-b-x-taskiq_rabbitmq"
    )


class FakeRabbitmqctl:
    """rabbitmqctl's JSON answers; each list_connections call adds ``step`` packets."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str]) -> str:
        self.calls.append(args)
        n = sum(1 for c in self.calls if c[0] == "list_connections")
        if args[0] == "list_queues":
            rows = [
                {"name": "bench-u-taskiq_rabbitmq", "type": "classic"},
                {"name": "bench-u-taskiq_rabbitmq_quorum3.p0", "type": "quorum"},
                {"name": "bench-u-taskiq_rabbitmq_quorum3.p1", "type": "quorum"},
                {"name": "bench-u-taskiq_rabbitmq_quorum3.p2", "type": "quorum"},
                {"name": "dt-u-taskiq_rabbitmq_quorum3.dead-letters", "type": "quorum"},
                {"name": "someone-else", "type": "classic"},
            ]
            return json.dumps(rows)

        def conn(pid: str, name: str, base: int) -> dict[str, Any]:
            props = [["product", "longstr", "aiormq"], ["connection_name", "longstr", name]]
            return {
                "pid": pid,
                "client_properties": props,
                "recv_cnt": base + n * self.step,
                "send_cnt": base + 2 * n * self.step,
                "recv_oct": 100 * n,
            }

        rows = [conn("<1.1>", "wc", 10), conn("<1.2>", "wc", 20), conn("<1.3>", "wq", 5)]
        rows.append(conn("<1.4>", "other", 0))
        return "Listing connections ...\n" + json.dumps(rows)


EXECUTORS_SEEN = {
    "taskiq_rabbitmq": ("wc", "bench-u-taskiq_rabbitmq", "dt-u-taskiq_rabbitmq"),
    "taskiq_rabbitmq_quorum3": (
        "wq",
        "bench-u-taskiq_rabbitmq_quorum3",
        "dt-u-taskiq_rabbitmq_quorum3",
    ),
}


def test_broker_probe_counts_the_workers_packets_and_queues() -> None:
    fake = FakeRabbitmqctl(step=7)
    probe = BrokerProbe(EXECUTORS_SEEN, RabbitCounter(fake), idle_window_s=0.0, log=lambda _: None)
    token = probe.before("taskiq_rabbitmq")
    fields = probe.after("taskiq_rabbitmq", token)
    # Two worker connections, 7 more packets each between the snapshots.
    assert fields == {
        "broker_packets_in": 14,
        "broker_packets_out": 28,
        "broker_bytes_in": 200,
        "broker_connections": 2,
    }
    assert probe.before("in_process") is None and probe.after("in_process", None) == {}
    records = probe.session_records()
    queues = {r["executor"]: r for r in records if r["type"] == "broker_queues"}
    assert queues["taskiq_rabbitmq"]["queues"] == ["bench-u-taskiq_rabbitmq"]
    assert queues["taskiq_rabbitmq_quorum3"]["queue_count"] == 4
    assert queues["taskiq_rabbitmq_quorum3"]["expected_queue_count"] == 4
    assert queues["taskiq_rabbitmq_quorum3"]["queue_types"] == ["quorum"]
    idle = {r["executor"]: r for r in records if r["type"] == "broker_idle"}
    assert idle["taskiq_rabbitmq"]["packets_in"] == 14
    assert idle["taskiq_rabbitmq_quorum3"]["packets_in"] == 7
    assert idle["taskiq_rabbitmq_quorum3"]["connections"] == 1


def test_broker_probe_without_rabbitmqctl_measures_nothing() -> None:
    counter = RabbitCounter(FakeRabbitmqctl(step=1))
    counter.available = False
    probe = BrokerProbe(EXECUTORS_SEEN, counter, idle_window_s=0.0)
    assert probe.after("taskiq_rabbitmq", probe.before("taskiq_rabbitmq")) == {}
    assert probe.session_records() == []


def _run(executor: str, scenario: str, wall: float, steps: int, packets: int) -> dict[str, Any]:
    return {
        "type": "run",
        "session": "s1",
        "scenario": scenario,
        "executor": executor,
        "steps": steps,
        "round": 1,
        "warmup": False,
        "success": True,
        "wall_s": wall,
        "cpu_s": 0.1,
        "peak_rss_mib": 100.0,
        "peak_growth_mib": 1.0,
        "broker_packets_in": packets,
        "broker_packets_out": packets,
    }


def _lanes_records() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [
        {"type": "meta", "session": "s1", "mode": "lanes", "storage": "sqlite (default)"}
    ]
    for wall in (2.0, 4.0, 3.0):
        records.append(_run("taskiq_rabbitmq", "chain_20", wall, 20, 60))
        records.append(_run("taskiq_rabbitmq_quorum3", "chain_20", wall * 1.5, 20, 260))
    warm = _run("taskiq_rabbitmq_quorum3", "chain_20", 99.0, 20, 999)
    records.append({**warm, "warmup": True, "round": 0})
    records.append(
        {
            "type": "broker_queues",
            "session": "s1",
            "executor": "taskiq_rabbitmq_quorum3",
            "queue_count": 4,
            "queue_types": ["quorum"],
        }
    )
    records.append(
        {
            "type": "broker_idle",
            "session": "s1",
            "executor": "taskiq_rabbitmq_quorum3",
            "packets_in_per_s": 0.5,
            "window_s": 10.0,
        }
    )
    return records


def test_lane_rows_ratios_against_classic() -> None:
    rows = lane_rows(_lanes_records())
    timed = {r["executor"]: r for r in rows if r["type"] == LANE_ROW}
    assert timed["taskiq_rabbitmq"]["ratio_fastest"] == pytest.approx(1.0)
    quorum = timed["taskiq_rabbitmq_quorum3"]
    assert quorum["n"] == 3  # the warm-up is left out
    assert quorum["fastest_s"] == pytest.approx(3.0) and quorum["median_s"] == pytest.approx(4.5)
    assert quorum["ratio_fastest"] == pytest.approx(1.5)
    assert quorum["ratio_median"] == pytest.approx(1.5)
    assert quorum["fastest_per_step_ms"] == pytest.approx(150.0)
    assert quorum["packets_in_per_step"] == pytest.approx(13.0)
    broker = {r["executor"]: r for r in rows if r["type"] == LANE_BROKER_ROW}
    assert broker["taskiq_rabbitmq_quorum3"]["queue_count"] == 4
    assert broker["taskiq_rabbitmq_quorum3"]["idle_packets_in_per_s"] == pytest.approx(0.5)
    assert broker["taskiq_rabbitmq"]["queue_count"] is None  # not measured
    text = format_lanes(rows, markdown=True)
    assert "| chain_20 | quorum, 3 lanes | 150.0 ms/hop | 225.0 ms/hop | 1.50× / 1.50× |" in text
    assert "| quorum, 3 lanes | 4 / 4 | 0.50 | 7 / 4 |" in text


def test_summarize_in_lanes_mode_has_lane_rows_and_no_targets_table() -> None:
    derived = summarize(_lanes_records())
    types = {r["type"] for r in derived}
    assert {LANE_ROW, LANE_BROKER_ROW} <= types
    assert "target_row" not in types
    # Without a quorum variant there is no lanes table.
    classic_only = [r for r in _lanes_records() if r.get("executor") != "taskiq_rabbitmq_quorum3"]
    assert lane_rows(classic_only) == []
