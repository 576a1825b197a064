"""``dead-letters list/show/replay/purge`` against a real worker, on both brokers.

A poison message is dead-lettered with its queue, listed, shown safely, replayed through the
broker (and dead-lettered again, since it is still bad), then purged.
"""

import json
import time
import uuid
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from taskiq import BrokerMessage, TaskiqMessage

from dagster_taskiq.cli import main as cli_main
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq_tests.harness import WorkerPool, executor_config, run_async, wait_for

#: Not JSON, and full of bytes a terminal would act on (escape sequences, NUL, bell).
POISON = b"\x1b[2J\x1b]0;owned\x07\x00\xff not a taskiq message \n\r"


def cli(settings: TaskiqSettings, workdir: Path, *args: str, stdin: str | None = None) -> Result:
    """Run ``dagster-taskiq ARGS -y CONFIG`` (the CLI command, in-process)."""
    config = workdir / "ops.yaml"
    config.write_text(json.dumps(executor_config(settings)))
    return CliRunner().invoke(cli_main, [*args, "-y", str(config)], input=stdin)


def listed(settings: TaskiqSettings, workdir: Path) -> list[dict[str, Any]]:
    """``dead-letters list --json``."""
    result = cli(settings, workdir, "dead-letters", "list", "--json")
    assert result.exit_code == 0, result.output
    return list(json.loads(result.stdout))


def test_dead_letter_round_trip(
    settings: TaskiqSettings, workers: WorkerPool, tmp_path: Path
) -> None:
    queue = settings.default_queue
    workers.start()
    forged_id = uuid.uuid4().hex

    async def _push(conn: TaskiqConnection) -> None:
        await conn.broker.kick(
            BrokerMessage(
                task_id="poison", task_name="", message=POISON, labels={"queue_name": queue}
            )
        )
        envelope = TaskiqMessage(
            task_id=forged_id, task_name="os.system", labels={}, args=["true"], kwargs={}
        )
        body = conn.broker.formatter.dumps(envelope).message
        await conn.broker.kick(
            BrokerMessage(
                task_id=forged_id, task_name="", message=body, labels={"queue_name": queue}
            )
        )

    run_async(settings, _push)
    letters = wait_for(
        lambda: (found := listed(settings, tmp_path)) and len(found) == 2 and found,
        60,
        interval=0.2,
        what="two dead letters",
    )
    by_task = {letter["task_id"]: letter for letter in letters}
    assert set(by_task) == {None, forged_id}, letters
    assert {letter["queue"] for letter in letters} == {queue}
    assert "Undecodable message" in by_task[None]["reason"]
    assert "'os.system', which is not a dagster-taskiq task" in by_task[forged_id]["reason"]
    assert len({letter["id"] for letter in letters}) == 2

    # The table view: one row per letter, and no raw control characters reach the terminal.
    table = cli(settings, tmp_path, "dead-letters", "list", f"--queue={queue}")
    assert table.exit_code == 0, table.output
    assert by_task[None]["id"] in table.output and by_task[forged_id]["id"] in table.output
    assert "\x1b" not in table.output and "\x00" not in table.output
    other = cli(settings, tmp_path, "dead-letters", "list", "--queue=elsewhere", "--json")
    assert other.exit_code == 0 and json.loads(other.stdout) == []

    # show: every field, the body escaped.
    poison_id = by_task[None]["id"]
    shown = cli(settings, tmp_path, "dead-letters", "show", poison_id, "--json")
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.stdout)
    assert document["id"] == poison_id and document["queue"] == queue
    assert document["size"] == len(POISON) and document["truncated"] is False
    assert document["body"].startswith("\\x1b[2J") and "not a taskiq message" in document["body"]
    assert document["body"].isprintable()
    plain = cli(settings, tmp_path, "dead-letters", "show", poison_id)
    assert plain.exit_code == 0 and f"queue:   {queue}" in plain.output
    assert "\x1b" not in plain.output

    missing = cli(settings, tmp_path, "dead-letters", "show", "nope")
    assert missing.exit_code == 1 and "No dead letter with id nope" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert cli(settings, tmp_path, "dead-letters", "replay").exit_code == 2

    # replay: back on its queue through the broker; the worker refuses it again, with its reason.
    replayed = cli(settings, tmp_path, "dead-letters", "replay", poison_id)
    assert replayed.exit_code == 0, replayed.output
    assert f"Replayed dead letter {poison_id} to queue '{queue}'" in replayed.output

    def _dead_again() -> list[dict[str, Any]] | None:
        found = listed(settings, tmp_path)
        ids = {letter["id"] for letter in found}
        return found if len(found) == 2 and poison_id not in ids else None

    again = wait_for(_dead_again, 60, interval=0.2, what="the replayed message to be refused again")
    fresh = next(letter for letter in again if letter["task_id"] is None)
    assert fresh["queue"] == queue and "Undecodable message" in fresh["reason"]

    # purge: asks first (and "no" keeps them), then deletes with --yes.
    declined = cli(settings, tmp_path, "dead-letters", "purge", "--all", stdin="n\n")
    assert declined.exit_code == 1 and len(listed(settings, tmp_path)) == 2
    purged = cli(settings, tmp_path, "dead-letters", "purge", fresh["id"], "--yes")
    assert purged.exit_code == 0 and "Purged 1 dead letter(s)." in purged.output
    assert [letter["task_id"] for letter in listed(settings, tmp_path)] == [forged_id]
    rest = cli(settings, tmp_path, "dead-letters", "purge", "--all", f"--queue={queue}", "--yes")
    assert rest.exit_code == 0 and "Purged 1 dead letter(s)." in rest.output
    assert listed(settings, tmp_path) == []
    status = cli(settings, tmp_path, "status", "--json")
    assert status.exit_code == 0 and json.loads(status.stdout)["dead_letters"] == 0


def test_dead_letters_are_capped_and_expire(settings: TaskiqSettings) -> None:
    """Adding beyond ``keep`` drops the oldest; entries older than the TTL go; both keys expire."""

    async def _fill(conn: TaskiqConnection) -> tuple[list[str], list[str], int, int, int]:
        book = conn.keystore.dead_letter_book
        old = await book.add(reason="old", raw=b"x", worker="w", keep=3, now=time.time() - 7200)
        added = [
            (await book.add(reason=f"r{i}", raw=b"y" * 70_000, worker="w", keep=3)).id
            for i in range(4)
        ]
        kept = [letter.id for letter in await book.entries()]
        redis, keys = conn.keystore.redis, conn.keystore.keys
        ttls = [await redis.ttl(keys.dead_letter_entries), await redis.ttl(keys.dead_letter_index)]
        fields = int(await redis.hlen(keys.dead_letter_entries))
        return [old.id, *added], kept, fields, *ttls

    ids, kept, fields, entries_ttl, index_ttl = run_async(settings, _fill)
    assert kept == list(reversed(ids[-3:]))  # newest first; the aged one and the oldest are gone
    assert fields == 3
    assert 0 < entries_ttl <= 3600 and 0 < index_ttl <= 3600  # result_ttl of the test settings
    letter = run_async(settings, lambda c: c.keystore.dead_letter_book.get(kept[0]))
    assert letter.size == 70_000 and letter.truncated and len(letter.body) == 65536
