"""Quorum queues on the real local RabbitMQ: priority lanes, and poison messages dead-lettered."""

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiormq.exceptions import ChannelPreconditionFailed
from click.testing import CliRunner
from dagster import DagsterInstance
from taskiq import BrokerMessage, TaskiqMessage

from dagster_taskiq.brokers.lanes import QueueLayout, lane_of
from dagster_taskiq.cli import main as cli_main
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq_tests.harness import (
    WorkerPool,
    executor_config,
    isolated_settings,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.scenario_jobs import LOG_ENV, read_notes, recon
from dagster_taskiq_tests.scenario_support import in_background, run_job, wait_new_run, wait_states
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL

#: Probe name -> op priority: lanes (of 3, max_priority 10) 0, 1 and 2, two probes each.
PRIORITIES = {"p_low": 1, "p_mid": 5, "p_high": 9, "p_min": 0, "p_top": 10, "p_mid2": 6}


@pytest.fixture
def quorum_settings(amqp_url: str, redis_url: str) -> TaskiqSettings:
    """Isolated settings for quorum queues with 3 lanes and a delivery limit of 1."""
    return isolated_settings(
        "rabbitmq",
        REDIS_URL,
        AMQP_URL,
        heartbeat_timeout=10.0,
        queue_type="quorum",
        delivery_limit=1,
    )


@pytest.fixture
def quorum_workers(quorum_settings: TaskiqSettings, dagster_home: Path) -> Iterator[WorkerPool]:
    """Workers on ``quorum_settings``; all are stopped at teardown."""
    pool = WorkerPool(quorum_settings, dagster_home)
    try:
        yield pool
    finally:
        pool.stop_all()


def _accepts(name: str, arguments: dict[str, Any]) -> bool:
    """Whether RabbitMQ accepts declaring queue ``name`` (which exists) with ``arguments``:
    it refuses with PRECONDITION_FAILED when they differ from the queue's own."""

    async def _main() -> bool:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments=arguments)
            return True
        except ChannelPreconditionFailed:
            return False
        finally:
            await connection.close()

    return asyncio.run(_main())


def test_mixed_priorities_on_quorum_lanes_run_highest_lane_first(
    instance: DagsterInstance,
    quorum_settings: TaskiqSettings,
    quorum_workers: WorkerPool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All probes wait in their lanes; one single-slot worker then runs them highest lane
    first, each lane in submission order, and the run succeeds."""
    order_log = tmp_path / "order.log"
    monkeypatch.setenv(LOG_ENV, str(order_log))
    settings = quorum_settings
    queue = f"{settings.default_queue}.ranked"
    job = recon("ranked_job", queue=queue, priorities=PRIORITIES)
    future = in_background(lambda: run_job(job, instance, settings))
    run = wait_new_run(instance, set(), future=future)
    queued = wait_states(settings, run.run_id, dict.fromkeys(PRIORITIES, "queued"))

    async def waiting_by_lane(conn: TaskiqConnection) -> list[int]:
        broker = conn.broker
        counts = []
        for lane in range(3):
            counts.append(await broker._waiting_one(f"{queue}.p{lane}"))  # type: ignore[attr-defined]
        return counts

    assert wait_for(
        lambda: run_async(settings, waiting_by_lane) == [2, 2, 2], what="two probes per lane"
    )
    assert run_async(settings, lambda conn: conn.broker.waiting(queue)) == len(PRIORITIES)

    quorum_workers.start(queues=[queue], concurrency=1)
    summary = future.result(timeout=180)
    assert summary.success
    ran = [what for _, _, run_id, what in read_notes(order_log) if run_id == run.run_id]
    expected = sorted(
        PRIORITIES, key=lambda n: (-lane_of(PRIORITIES[n], 10, 3), queued[n].submitted_at)
    )
    assert ran == expected
    assert all(summary.starts(name) == 1 for name in PRIORITIES)
    # The lanes really are quorum queues with a delivery limit and a dead-letter exchange.
    quorum = QueueLayout(
        exchange=str(settings.config_source["exchange"]), queue_type="quorum", delivery_limit=1
    )
    arguments = quorum.arguments(settings.config_source["queue_arguments"])
    assert _accepts(f"{queue}.p2", arguments)
    assert not _accepts(f"{queue}.p2", {**arguments, "x-queue-type": "classic"})


def test_poison_message_past_the_delivery_limit_lands_in_dead_letters(
    quorum_settings: TaskiqSettings, quorum_workers: WorkerPool, tmp_path: Path
) -> None:
    """A message handed back more often than ``delivery_limit`` allows is dead-lettered by
    RabbitMQ; a worker records it, with its queue and a reason, where ``dead-letters list``
    shows it."""
    settings = quorum_settings
    queue = f"{settings.default_queue}.poison"
    task_id = f"poison-{uuid.uuid4().hex[:8]}"

    async def publish(conn: TaskiqConnection) -> None:
        body = conn.broker.formatter.dumps(
            TaskiqMessage(task_id=task_id, task_name="never.run", labels={}, args=[], kwargs={})
        ).message
        await conn.broker.kick(
            BrokerMessage(
                task_id=task_id,
                task_name="never.run",
                message=body,
                labels={"queue_name": queue, "priority": 9},
            )
        )

    run_async(settings, publish)

    async def hand_back_until_gone() -> int:
        """Take the message and return it unacknowledged until RabbitMQ stops delivering it."""
        connection = await aio_pika.connect(AMQP_URL)
        returned = 0
        try:
            channel = await connection.channel()
            lane = await channel.get_queue(f"{queue}.p2", ensure=False)
            for _ in range(20):
                message = await lane.get(no_ack=False, fail=False)
                if message is None:
                    break
                await message.reject(requeue=True)
                returned += 1
        finally:
            await connection.close()
        return returned

    assert asyncio.run(hand_back_until_gone()) == 2  # delivery_limit 1: the second return kills it

    quorum_workers.start(queues=[queue])

    def letters() -> list[dict[str, object]]:
        config = tmp_path / "ops.yaml"
        config.write_text(json.dumps(executor_config(settings)))
        result = CliRunner().invoke(cli_main, ["dead-letters", "list", "--json", "-y", str(config)])
        assert result.exit_code == 0, result.output
        return list(json.loads(result.stdout))

    [letter] = wait_for(letters, timeout=60, what="the poison message in the dead letters")
    assert letter["queue"] == queue
    assert letter["task_id"] == task_id
    assert f"{queue}.p2" in str(letter["reason"]) and "delivery_limit" in str(letter["reason"])
    # Nothing was run and nothing is left in RabbitMQ.
    assert run_async(settings, lambda conn: conn.broker.waiting(queue)) == 0
    assert run_async(settings, lambda conn: conn.keystore.get(task_id)) is None


def test_existing_classic_queue_gives_a_clear_error(quorum_settings: TaskiqSettings) -> None:
    """A lane queue that exists with other arguments is named, with what to do."""
    from dagster_taskiq.errors import TaskiqConfigError

    queue = f"{quorum_settings.default_queue}.clash"

    async def declare_classic() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            await channel.declare_queue(
                f"{queue}.p0", durable=True, arguments={"x-expires": 600_000}
            )
        finally:
            await connection.close()

    asyncio.run(declare_classic())

    async def kick(conn: TaskiqConnection) -> None:
        await conn.broker.kick(
            BrokerMessage(task_id="t", task_name="n", message=b"{}", labels={"queue_name": queue})
        )

    with pytest.raises(TaskiqConfigError) as error:
        run_async(quorum_settings, kick)
    assert f"'{queue}.p0'" in str(error.value)
    assert "delete" in str(error.value).lower() and "queue_type" in str(error.value)
