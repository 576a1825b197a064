"""``run lanes``: what RabbitMQ priority lanes cost, classic queues against quorum lanes.

Quorum queues have no ``x-max-priority``, so ``queue_type: quorum`` with ``priority_lanes: N``
declares ``N`` quorum queues per queue (see :mod:`dagster_taskiq.brokers.lanes`). This mode runs
the same scenarios on ``taskiq_rabbitmq`` (classic queues with ``x-max-priority``, the baseline)
and on ``taskiq_rabbitmq_quorum<N>`` for each ``N`` of :data:`LANE_COUNTS`, in interleaved
rounds, and measures on the broker side, with ``rabbitmqctl`` (no management plugin needed):

- the queues each executor's session left declared on RabbitMQ (``list_queues``);
- the TCP packets RabbitMQ received from (and sent to) the workers' own connections
  (``list_connections recv_cnt send_cnt``), per run and over an idle window. The workers'
  connections are told apart by the AMQP connection name the benchmark gives them
  (:func:`named_url`). A packet is not a frame, but every synchronous AMQP call (``basic.get``,
  ``basic.consume``, ``basic.cancel``) is at least one packet each way, so the count follows the
  round trips.

This module does not import Dagster, so ``report`` stays light.
"""

import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from benchmarks.tables import render_table

#: The baseline: classic queues, one per queue, ordered by ``x-max-priority``.
CLASSIC_EXECUTOR = "taskiq_rabbitmq"
#: ``priority_lanes`` of the quorum variants ``run lanes`` compares with the baseline.
LANE_COUNTS = (1, 3, 5)
LANE_PREFIX = "taskiq_rabbitmq_quorum"
#: The quorum executor variants, ``taskiq_rabbitmq_quorum1`` ... (see ``benchmarks.env``).
LANE_VARIANTS = tuple(f"{LANE_PREFIX}{n}" for n in LANE_COUNTS)
#: What ``run lanes`` runs by default: the baseline first, then the lanes in ascending order.
LANES_EXECUTORS = (CLASSIC_EXECUTOR, *LANE_VARIANTS)
#: Seconds the idle window lasts, in which no run is going and the workers wait for work.
IDLE_WINDOW_S = 10.0
#: Record types this module derives from the raw records (recomputed by ``report``).
LANE_ROW = "lane_row"


def lanes_of(executor: str) -> int:
    """``priority_lanes`` of a quorum variant; 0 for anything else (classic or not RabbitMQ)."""
    suffix = executor.removeprefix(LANE_PREFIX)
    if suffix == executor or not suffix.isdigit():
        return 0
    return int(suffix)


def expected_queue_count(lanes: int, logical_queues: int = 1) -> int:
    """RabbitMQ queues that ``logical_queues`` queues become, by the code path: one classic
    queue each (``lanes == 0``), or ``lanes`` quorum queues each plus the exchange's one
    dead-letter queue."""
    return logical_queues if lanes == 0 else lanes * logical_queues + 1


def pull_round_trips(lanes: int, logical_queues: int = 1) -> dict[str, int]:
    """Synchronous AMQP calls one pull of an idle worker makes, by the code path
    (``RoutedAioPikaBroker._take_one``) when every queue is empty.

    ``before_wait``: on the critical path, before the worker can be handed a message:
    ``basic.get`` per lane (only with two lanes or more), then one ``basic.consume`` per queue
    (lanes and the dead-letter queue). ``after_delivery``: the ``basic.cancel`` per consumer,
    sent in the background once a message arrived.
    """
    if lanes == 0:
        consumers = logical_queues
        gets = 0
    else:
        consumers = lanes * logical_queues + 1
        gets = lanes * logical_queues if lanes > 1 else 0
    return {"before_wait": gets + consumers, "after_delivery": consumers}


def worker_connection_name(uid: str, executor: str) -> str:
    """The AMQP connection name the workers of ``executor`` in session ``uid`` connect with."""
    return f"bench-{uid}-{executor}-worker"


def named_url(url: str, name: str) -> str:
    """``url`` with ``?name=`` set: aiormq sends it as the connection's ``connection_name``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "name"]
    query.append(("name", name))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def owns_queue(queue: str, default_queue: str, exchange: str) -> bool:
    """Whether RabbitMQ queue ``queue`` belongs to the executor with this default queue and
    exchange: the queue itself, its lanes, or the exchange's dead-letter queue."""
    for stem in (default_queue, exchange):
        if queue == stem or (queue.startswith(stem) and queue[len(stem)] in ".-"):
            return True
    return False


# -- rabbitmqctl -----------------------------------------------------------------------------
#: Runs ``rabbitmqctl <args> --formatter json`` and returns its output.
Runner = Callable[[list[str]], str]
_COUNTERS = ("recv_cnt", "send_cnt", "recv_oct")


def _rabbitmqctl(args: list[str]) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args, "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def _json_rows(text: str) -> list[dict[str, Any]]:
    start = text.find("[")
    rows = json.loads(text[start:]) if start >= 0 else []
    return [row for row in rows if isinstance(row, dict)]


def _connection_name(properties: Any) -> str | None:
    """``connection_name`` out of ``client_properties`` as rabbitmqctl's JSON gives them
    (``[[key, type, value], ...]``)."""
    if isinstance(properties, Mapping):
        value = properties.get("connection_name")
        return str(value) if value is not None else None
    for entry in properties or []:
        if isinstance(entry, list) and len(entry) == 3 and entry[0] == "connection_name":
            return str(entry[2])
    return None


class RabbitCounter:
    """Connection and queue counters of the local RabbitMQ node, read with ``rabbitmqctl``."""

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or _rabbitmqctl
        self.available = runner is not None or shutil.which("rabbitmqctl") is not None

    def packets(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per connection (by its pid) with one of ``names``: its ``name``, ``recv_cnt``
        (packets RabbitMQ received), ``send_cnt`` and ``recv_oct``."""
        wanted = set(names)
        rows = _json_rows(self.runner(["list_connections", "pid", "client_properties", *_COUNTERS]))
        found: dict[str, dict[str, Any]] = {}
        for row in rows:
            name = _connection_name(row.get("client_properties"))
            if name in wanted:
                counts = {key: int(row.get(key) or 0) for key in _COUNTERS}
                found[str(row.get("pid"))] = {"name": name, **counts}
        return found

    def queues(self) -> list[tuple[str, str]]:
        """Every queue of the default vhost: ``(name, type)``."""
        rows = _json_rows(self.runner(["list_queues", "name", "type"]))
        return [(str(row.get("name")), str(row.get("type"))) for row in rows]


def packet_delta(
    before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
) -> dict[str, int]:
    """Summed counter growth of the connections present in both snapshots (a connection
    opened or closed in between is left out)."""
    common = [pid for pid in after if pid in before]
    total = {"connections": len(common)}
    for key in _COUNTERS:
        total[key] = sum(after[pid][key] - before[pid][key] for pid in common)
    return total


class BrokerProbe:
    """Broker-side figures of a ``run lanes`` session (a :class:`benchmarks.runner.RunProbe`).

    ``executors`` maps each RabbitMQ executor to ``(connection name, default queue, exchange)``.
    """

    def __init__(
        self,
        executors: Mapping[str, tuple[str, str, str]],
        counter: RabbitCounter | None = None,
        idle_window_s: float = IDLE_WINDOW_S,
        log: Callable[[str], None] = print,
    ) -> None:
        self.executors = dict(executors)
        self.counter = counter or RabbitCounter()
        self.idle_window_s = idle_window_s
        self.log = log
        self._warned = False

    def _snapshot(self, names: Iterable[str]) -> dict[str, dict[str, Any]] | None:
        if not self.counter.available:
            return None
        try:
            return self.counter.packets(names)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            if not self._warned:
                self.log(f"rabbitmqctl list_connections failed, no packet counts: {exc}")
                self._warned = True
            return None

    def before(self, executor: str) -> Any:
        """The executor's worker connections' counters before a run (None: not measured)."""
        if executor not in self.executors:
            return None
        return self._snapshot([self.executors[executor][0]])

    def after(self, executor: str, token: Any) -> dict[str, Any]:
        """Fields for the run's record: packets RabbitMQ received from and sent to the workers."""
        if token is None:
            return {}
        now = self._snapshot([self.executors[executor][0]])
        if now is None:
            return {}
        delta = packet_delta(token, now)
        return {
            "broker_packets_in": delta["recv_cnt"],
            "broker_packets_out": delta["send_cnt"],
            "broker_bytes_in": delta["recv_oct"],
            "broker_connections": delta["connections"],
        }

    def session_records(self) -> list[dict[str, Any]]:
        """After the scenarios: the queues each executor declared, and an idle window's
        packets (every executor's workers idle at once, for :attr:`idle_window_s`)."""
        records: list[dict[str, Any]] = []
        if not self.executors or not self.counter.available:
            return records
        try:
            queues = self.counter.queues()
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            self.log(f"rabbitmqctl list_queues failed: {exc}")
            queues = None
        if queues is not None:
            for executor, (_, default_queue, exchange) in self.executors.items():
                mine = sorted(
                    (name, kind)
                    for name, kind in queues
                    if owns_queue(name, default_queue, exchange)
                )
                records.append(
                    {
                        "type": "broker_queues",
                        "executor": executor,
                        "priority_lanes": lanes_of(executor),
                        "queues": [name for name, _ in mine],
                        "queue_types": sorted({kind for _, kind in mine}),
                        "queue_count": len(mine),
                        "expected_queue_count": expected_queue_count(lanes_of(executor)),
                        "pull_round_trips": pull_round_trips(lanes_of(executor)),
                    }
                )
        names = [name for name, _, _ in self.executors.values()]
        start = self._snapshot(names)
        if start is None:
            return records
        started = time.monotonic()
        time.sleep(self.idle_window_s)  # the measurement itself: workers idle for a fixed time
        end = self._snapshot(names)
        window = time.monotonic() - started
        if end is None:
            return records
        for executor, (name, _, _) in self.executors.items():
            delta = packet_delta(_named(start, name), _named(end, name))
            records.append(
                {
                    "type": "broker_idle",
                    "executor": executor,
                    "priority_lanes": lanes_of(executor),
                    "window_s": round(window, 2),
                    "packets_in": delta["recv_cnt"],
                    "packets_out": delta["send_cnt"],
                    "connections": delta["connections"],
                    "packets_in_per_s": delta["recv_cnt"] / window,
                }
            )
        return records


def _named(snapshot: Mapping[str, Mapping[str, Any]], name: str) -> dict[str, Mapping[str, Any]]:
    return {pid: counts for pid, counts in snapshot.items() if counts.get("name") == name}


# -- summary ---------------------------------------------------------------------------------
#: The broker-side row of an executor (queues, idle packets, round trips per pull).
LANE_BROKER_ROW = "lane_broker_row"
LANE_TYPES = frozenset({LANE_ROW, LANE_BROKER_ROW})


def is_lanes_executor(executor: str) -> bool:
    """Whether ``executor`` is compared by ``run lanes`` (the classic baseline or a variant)."""
    return executor == CLASSIC_EXECUTOR or lanes_of(executor) > 0


def _order(executor: str) -> tuple[int, str]:
    return (lanes_of(executor), executor)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if (a is not None and b) else None


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def lane_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lanes tables of one storage's raw records, or nothing if no quorum variant ran.

    One ``lane_row`` per scenario and executor: fastest and median wall time and time per step
    over the measured rounds, each ÷ the classic baseline's (fastest ÷ fastest, median ÷
    median), and the median packets RabbitMQ received from and sent to the workers per step.
    One ``lane_broker_row`` per executor: queues declared (measured and by the code path),
    packets per second while idle, and the round trips of an idle worker's pull.
    """
    runs = [
        r
        for r in records
        if r.get("type") == "run"
        and not r.get("warmup")
        and is_lanes_executor(str(r.get("executor")))
    ]
    if not any(lanes_of(str(r["executor"])) for r in runs) and not any(
        r.get("type") == "broker_queues" for r in records
    ):
        return []
    scenarios: list[str] = []
    for run in runs:
        if run["scenario"] not in scenarios:
            scenarios.append(run["scenario"])
    executors = sorted({str(r["executor"]) for r in runs}, key=_order)
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        walls: dict[str, list[float]] = {}
        for executor in executors:
            ok = [r for r in runs if (r["scenario"], r["executor"]) == (scenario, executor)]
            walls[executor] = [r["wall_s"] for r in ok if r.get("success")]
        base = walls.get(CLASSIC_EXECUTOR, [])
        for executor in executors:
            group = [r for r in runs if (r["scenario"], r["executor"]) == (scenario, executor)]
            if not group:
                continue
            ok = [r for r in group if r.get("success")]
            steps = int(group[0]["steps"])
            mine = walls[executor]
            fastest = min(mine) if mine else None
            median = _median(mine)
            packets_in = [r["broker_packets_in"] / steps for r in ok if "broker_packets_in" in r]
            packets_out = [r["broker_packets_out"] / steps for r in ok if "broker_packets_out" in r]
            rows.append(
                {
                    "type": LANE_ROW,
                    "scenario": scenario,
                    "executor": executor,
                    "priority_lanes": lanes_of(executor),
                    "steps": steps,
                    "n": len(group),
                    "failures": len(group) - len(ok),
                    "fastest_s": fastest,
                    "median_s": median,
                    "fastest_per_step_ms": None if fastest is None else 1000 * fastest / steps,
                    "median_per_step_ms": None if median is None else 1000 * median / steps,
                    "ratio_fastest": _ratio(fastest, min(base) if base else None),
                    "ratio_median": _ratio(median, _median(base)),
                    "packets_in_per_step": _median(packets_in),
                    "packets_out_per_step": _median(packets_out),
                }
            )
    queues = {r["executor"]: r for r in records if r.get("type") == "broker_queues"}
    idle = {r["executor"]: r for r in records if r.get("type") == "broker_idle"}
    for executor in sorted(set(executors) | set(queues) | set(idle), key=_order):
        q, i = queues.get(executor, {}), idle.get(executor, {})
        trips = pull_round_trips(lanes_of(executor))
        rows.append(
            {
                "type": LANE_BROKER_ROW,
                "executor": executor,
                "priority_lanes": lanes_of(executor),
                "queue_count": q.get("queue_count"),
                "queue_types": q.get("queue_types"),
                "expected_queue_count": expected_queue_count(lanes_of(executor)),
                "idle_packets_in_per_s": i.get("packets_in_per_s"),
                "idle_window_s": i.get("window_s"),
                "pull_round_trips_before_wait": trips["before_wait"],
                "pull_round_trips_after_delivery": trips["after_delivery"],
            }
        )
    return rows


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else f"{value:{spec}}"


def _label(executor: str) -> str:
    lanes = lanes_of(executor)
    return "classic (x-max-priority)" if lanes == 0 else f"quorum, {lanes} lane{'s' * (lanes > 1)}"


def format_lanes(records: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The lanes tables (``lane_row`` and ``lane_broker_row`` records) as text or Markdown."""
    rows = [r for r in records if r.get("type") == LANE_ROW]
    broker = [r for r in records if r.get("type") == LANE_BROKER_ROW]
    if not rows and not broker:
        return ""
    table: list[list[str]] = []
    header = [
        "scenario",
        "queues",
        "fastest",
        "median",
        "÷ classic (fastest / median)",
        "packets in / out per step",
        "n",
    ]
    for r in rows:
        chain = str(r["scenario"]).startswith("chain")
        fastest = (
            f"{_f(r['fastest_per_step_ms'], '.1f')} ms/hop"
            if chain
            else f"{_f(r['fastest_s'], '.2f')} s"
        )
        median = (
            f"{_f(r['median_per_step_ms'], '.1f')} ms/hop"
            if chain
            else f"{_f(r['median_s'], '.2f')} s"
        )
        table.append(
            [
                str(r["scenario"]),
                _label(str(r["executor"])),
                fastest,
                median,
                f"{_f(r['ratio_fastest'], '.2f')}× / {_f(r['ratio_median'], '.2f')}×",
                f"{_f(r['packets_in_per_step'], '.1f')} / {_f(r['packets_out_per_step'], '.1f')}",
                f"{r['n']}" + (f" ({r['failures']} failed)" if r["failures"] else ""),
            ]
        )
    second_header = [
        "queues",
        "RabbitMQ queues for one task queue (measured / by code)",
        "idle packets in per s",
        "round trips per idle pull: before the wait / after a delivery",
    ]
    second = [
        [
            _label(str(b["executor"])),
            f"{b['queue_count'] if b['queue_count'] is not None else '–'} / "
            f"{b['expected_queue_count']}",
            _f(b["idle_packets_in_per_s"], ".2f"),
            f"{b['pull_round_trips_before_wait']} / {b['pull_round_trips_after_delivery']}",
        ]
        for b in broker
    ]
    first_table = render_table(header, table, markdown)
    return first_table + "\n\n" + render_table(second_header, second, markdown)
