"""``dagster-taskiq status --watch``: redraw the status every few seconds until interrupted."""

import asyncio
import datetime
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click


async def watch_status(
    conn: Any,
    interval: float,
    collect: Callable[[Any], Awaitable[dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    as_json: bool,
) -> None:
    """Redraw the status every ``interval`` seconds on one connection, until cancelled.

    On a terminal the screen is cleared before each redraw; otherwise each redraw is a header
    line followed by the tables (or, with ``as_json``, one JSON object per line).
    """
    while True:
        document = await collect(conn)
        if as_json:
            click.echo(json.dumps(document))
        else:
            if sys.stdout.isatty():
                click.clear()
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            click.echo(f"Every {interval:g} s: dagster-taskiq status    {now}\n")
            click.echo(render(document))
            click.echo("")
        sys.stdout.flush()
        await asyncio.sleep(interval)
