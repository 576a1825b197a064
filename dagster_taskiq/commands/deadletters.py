"""``dagster-taskiq dead-letters list|show|replay|purge``: the messages workers refused."""

import json
from collections.abc import Sequence
from typing import Any

import click
from taskiq import BrokerMessage

from dagster_taskiq.commands.common import (
    UserError,
    connection_options,
    format_table,
    format_time,
    load_settings,
    one_line,
    user_errors,
    with_connection,
)
from dagster_taskiq.lifecycle.deadletters import DeadLetter

#: Characters of a reason that ``dead-letters list`` shows (``--json`` has it whole).
REASON_CHARS = 70


@click.group("dead-letters")
def dead_letters() -> None:
    """List, show, replay and purge the messages workers refused (dead letters)."""


def _summary(letter: DeadLetter) -> dict[str, Any]:
    return {**letter.summary(), "at": format_time(letter.at)}


def _check_selection(ids: Sequence[str], all_: bool) -> None:
    """Usage error (exit code 2) unless exactly one of ``ids`` and ``--all`` is given."""
    if bool(ids) == all_:
        raise click.UsageError("Name one or more dead-letter ids, or pass --all (not both).")


def _select(
    letters: Sequence[DeadLetter], ids: Sequence[str], all_: bool, queue: str | None
) -> list[DeadLetter]:
    """The dead letters named by ``ids`` (or all with ``all_``), on ``queue`` if given.

    :raises UserError: an id names no dead letter.
    """
    _check_selection(ids, all_)
    by_id = {letter.id: letter for letter in letters}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(
            f"No dead letter with id {', '.join(missing)}; see 'dagster-taskiq dead-letters list'."
        )
    chosen = list(letters) if all_ else [by_id[i] for i in dict.fromkeys(ids)]
    return [letter for letter in chosen if queue is None or letter.queue == queue]


@dead_letters.command("list")
@connection_options
@click.option("--queue", default=None, help="Only dead letters that came from this queue.")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON list.")
@user_errors
def list_dead_letters(
    config_yaml: str | None, broker: str | None, backend: str | None, queue: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """List dead letters, newest first: id, queue, time, task id, reason, body preview."""
    settings = load_settings(config_yaml, broker, backend)

    async def _list(conn: Any) -> list[DeadLetter]:
        return list(await conn.keystore.dead_letter_book.entries())

    letters = [
        letter
        for letter in with_connection(settings, _list)
        if queue is None or letter.queue == queue
    ]
    if as_json:
        click.echo(json.dumps([_summary(letter) for letter in letters]))
        return
    if not letters:
        click.echo("No dead letters.")
        return
    rows = [
        (
            letter.id,
            letter.queue or "-",
            format_time(letter.at),
            letter.task_id or "-",
            _cut(one_line(letter.reason), REASON_CHARS),
            letter.preview(),
        )
        for letter in letters
    ]
    click.echo(format_table(("ID", "QUEUE", "AT", "TASK", "REASON", "BODY"), rows))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dead_letters.command("show")
@connection_options
@click.argument("letter_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON object.")
@user_errors
def show_dead_letter(
    config_yaml: str | None, broker: str | None, backend: str | None, letter_id: str,
    as_json: bool,
) -> None:  # fmt: skip
    """Show one dead letter in full; the body is printed as escaped text, never decoded."""
    settings = load_settings(config_yaml, broker, backend)
    letter = with_connection(settings, lambda conn: conn.keystore.dead_letter_book.get(letter_id))
    if letter is None:
        raise UserError(
            f"No dead letter with id {letter_id}; see 'dagster-taskiq dead-letters list'."
        )
    document = {**letter.document(), "at": format_time(letter.at)}
    if as_json:
        click.echo(json.dumps(document))
        return
    kept = f"{len(letter.body)} of {letter.size} bytes kept" if letter.truncated else ""
    lines = [
        f"id:      {letter.id}",
        f"queue:   {letter.queue or '-'}",
        f"at:      {document['at']}",
        f"task:    {letter.task_id or '-'}",
        f"worker:  {letter.worker}",
        f"reason:  {one_line(letter.reason)}",
        f"size:    {letter.size} bytes{f' ({kept})' if kept else ''}",
        "body (escaped):",
        document["body"],
    ]
    click.echo("\n".join(lines))


def _priority_of(body: bytes) -> int:
    """The ``priority`` label of a taskiq JSON body, or 0 (the body is read as JSON only)."""
    try:
        labels = json.loads(body).get("labels", {})
        return int(labels.get("priority", 0))
    except Exception:
        return 0


@dead_letters.command("replay")
@connection_options
@click.argument("letter_ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Replay every dead letter (see --queue).")
@click.option("--queue", default=None, help="Only dead letters that came from this queue.")
@user_errors
def replay_dead_letters(
    config_yaml: str | None, broker: str | None, backend: str | None,
    letter_ids: Sequence[str], all_: bool, queue: str | None,
) -> None:  # fmt: skip
    """Put dead letters back on the queue they came from, through the broker.

    Workers validate a replayed message like any other: one that is still bad is dead-lettered
    again (with a new id and its reason). A dead letter with no recorded queue goes to the
    default queue; one whose body was cut when it was kept cannot be replayed and stays.
    """
    _check_selection(letter_ids, all_)
    settings = load_settings(config_yaml, broker, backend)
    keep = int(settings.option("dead_letter_max", 1000))

    async def _replay(conn: Any) -> tuple[list[tuple[DeadLetter, str]], list[DeadLetter]]:
        book = conn.keystore.dead_letter_book
        chosen = _select(await book.entries(), letter_ids, all_, queue)
        cut = [letter for letter in chosen if letter.truncated]
        sent: list[tuple[DeadLetter, str]] = []
        for letter in await book.take([x.id for x in chosen if not x.truncated]):
            target = letter.queue or settings.default_queue
            message = BrokerMessage(
                task_id=letter.task_id or f"dead-letter-{letter.id}",
                task_name="",
                message=letter.body,
                labels={"queue_name": target, "priority": _priority_of(letter.body)},
            )
            try:
                await conn.broker.kick(message)
            except BaseException:
                await book.put_back(letter, keep)
                raise
            sent.append((letter, target))
        return sent, cut

    sent, cut = with_connection(settings, _replay)
    for letter, target in sent:
        click.echo(f"Replayed dead letter {letter.id} to queue '{target}'.")
    if not sent and not cut:
        click.echo("No dead letters to replay.")
    if cut:
        raise UserError(
            f"Could not replay {', '.join(x.id for x in cut)}: only the start of the body was "
            "kept (it was larger than 64 KiB). Purge them with 'dagster-taskiq dead-letters purge'."
        )


@dead_letters.command("purge")
@connection_options
@click.argument("letter_ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Purge every dead letter (see --queue).")
@click.option("--queue", default=None, help="Only dead letters that came from this queue.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@user_errors
def purge_dead_letters(
    config_yaml: str | None, broker: str | None, backend: str | None,
    letter_ids: Sequence[str], all_: bool, queue: str | None, yes: bool,
) -> None:  # fmt: skip
    """Delete dead letters for good (asks first unless --yes)."""
    _check_selection(letter_ids, all_)
    settings = load_settings(config_yaml, broker, backend)
    if not yes:
        what = "every dead letter" if all_ else f"{len(letter_ids)} dead letter(s)"
        where = f" from queue '{queue}'" if queue else ""
        click.confirm(f"Delete {what}{where}?", abort=True)

    async def _purge(conn: Any) -> list[DeadLetter]:
        book = conn.keystore.dead_letter_book
        chosen = _select(await book.entries(), letter_ids, all_, queue)
        return list(await book.take([letter.id for letter in chosen]))

    purged = with_connection(settings, _purge)
    click.echo(f"Purged {len(purged)} dead letter(s).")
