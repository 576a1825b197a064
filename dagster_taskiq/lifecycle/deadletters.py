"""Dead letters: messages workers refused, kept for operators to list, show, replay or purge.

Each refused message gets a stable id. Its entry (JSON: queue, reason, worker, time, task id if
known, and the first :data:`BODY_LIMIT` bytes of the raw body, base64-encoded) lives in one hash,
and an index sorted by time caps how many are kept (``dead_letter_max``): adding one drops the
oldest beyond the cap and any older than the TTL. Both keys expire ``result_ttl`` after the last
addition. Nothing in a body is ever decoded as anything but bytes.
"""

import base64
import dataclasses
import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from dagster_taskiq.lifecycle.keys import KeySpace

#: Bytes of a refused message's body that are kept (the rest is dropped, and the entry says so).
BODY_LIMIT = 65536
#: Characters of a body that ``dead-letters list`` previews.
PREVIEW_CHARS = 60

# KEYS[1] entries hash, KEYS[2] index zset. ARGV: id, entry JSON, now, keep, ttl (s).
# Adds the entry, then drops entries older than ttl and the oldest beyond ``keep``.
_ADD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local ttl = tonumber(ARGV[5])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (tonumber(ARGV[3]) - ttl))
local extra = redis.call('ZCARD', KEYS[2]) - #gone - tonumber(ARGV[4])
if extra > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], #gone, #gone + extra - 1)) do
    table.insert(gone, id)
  end
end
for _, id in ipairs(gone) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[1], id)
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return #gone
"""

# KEYS[1] entries hash, KEYS[2] index zset. ARGV: ids. Removes them and returns their entries
# (absent ids are skipped), so that two operators never both take the same dead letter.
_TAKE = """
local taken = {}
for _, id in ipairs(ARGV) do
  local entry = redis.call('HGET', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if entry then
    redis.call('HDEL', KEYS[1], id)
    table.insert(taken, entry)
  end
end
return taken
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def safe_text(data: bytes) -> str:
    """``data`` as printable text: UTF-8 where it decodes, every other byte and every control
    character (newlines and tabs included) escaped, so a body can never drive a terminal."""
    text = data.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One refused message as kept in the dead letters."""

    id: str
    queue: str | None
    reason: str
    worker: str
    at: float
    task_id: str | None
    #: Length of the body the worker received, in bytes.
    size: int
    #: The first :data:`BODY_LIMIT` bytes of the body.
    body: bytes

    @property
    def truncated(self) -> bool:
        """Whether only the start of the body was kept."""
        return len(self.body) < self.size

    def to_json(self) -> str:
        """The stored form (the body base64-encoded)."""
        fields = dataclasses.asdict(self)
        fields["body"] = base64.b64encode(self.body).decode("ascii")
        return json.dumps(fields)

    @classmethod
    def from_json(cls, raw: Any) -> "DeadLetter":
        """Parse the stored form."""
        data = json.loads(raw)
        return cls(
            id=str(data["id"]),
            queue=data.get("queue"),
            reason=str(data.get("reason", "")),
            worker=str(data.get("worker", "")),
            at=float(data.get("at", 0.0)),
            task_id=data.get("task_id"),
            size=int(data.get("size", 0)),
            body=base64.b64decode(data.get("body", "")),
        )

    def preview(self, limit: int = PREVIEW_CHARS) -> str:
        """The start of the body as safe text, ``...`` where it was cut."""
        text = safe_text(self.body[: limit * 4])
        return text if len(text) <= limit and not self.truncated else text[:limit] + "..."

    def summary(self) -> dict[str, Any]:
        """What ``dead-letters list --json`` shows for it (no body)."""
        return {
            "id": self.id,
            "queue": self.queue,
            "reason": self.reason,
            "at": self.at,
            "task_id": self.task_id,
            "worker": self.worker,
            "size": self.size,
        }

    def document(self) -> dict[str, Any]:
        """What ``dead-letters show --json`` shows: the summary plus the body as safe text."""
        return {**self.summary(), "truncated": self.truncated, "body": safe_text(self.body)}


class DeadLetterBook:
    """Adds, lists and takes dead letters under one key prefix."""

    def __init__(self, redis: Redis, keys: KeySpace, ttl: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = ttl
        self._add = redis.register_script(_ADD)
        self._take = redis.register_script(_TAKE)

    @property
    def _keys(self) -> list[str]:
        return [self.keys.dead_letter_entries, self.keys.dead_letter_index]

    async def add(
        self,
        *,
        reason: str,
        raw: bytes,
        worker: str,
        keep: int,
        queue: str | None = None,
        task_id: str | None = None,
        now: float | None = None,
    ) -> DeadLetter:
        """Keep ``raw`` with why it was refused; returns the new entry (with its id)."""
        letter = DeadLetter(
            id=secrets.token_hex(6),
            queue=queue,
            reason=reason,
            worker=worker,
            at=time.time() if now is None else now,
            task_id=task_id,
            size=len(raw),
            body=bytes(raw[:BODY_LIMIT]),
        )
        await self._add(
            keys=self._keys,
            args=[letter.id, letter.to_json(), repr(letter.at), max(1, keep), self.ttl],
        )
        return letter

    async def entries(self, limit: int = 10_000) -> list[DeadLetter]:
        """The kept dead letters, newest first."""
        ids: list[Any] = list(await self.redis.zrevrange(self.keys.dead_letter_index, 0, limit - 1))
        if not ids:
            return []
        entries = await self.redis.hmget(self.keys.dead_letter_entries, ids)
        return [DeadLetter.from_json(e) for e in entries if e is not None]

    async def get(self, letter_id: str) -> DeadLetter | None:
        """One dead letter, or None if there is none with that id."""
        entry = await self.redis.hget(self.keys.dead_letter_entries, letter_id)
        return DeadLetter.from_json(entry) if entry is not None else None

    async def take(self, letter_ids: Sequence[str]) -> list[DeadLetter]:
        """Remove these dead letters and return the ones that existed."""
        if not letter_ids:
            return []
        taken = await self._take(keys=self._keys, args=list(letter_ids))
        return [DeadLetter.from_json(_text(e)) for e in taken]

    async def count(self) -> int:
        """How many dead letters are kept."""
        return int(await self.redis.zcard(self.keys.dead_letter_index))

    async def put_back(self, letter: DeadLetter, keep: int) -> None:
        """Keep ``letter`` again under its own id (a replay that could not be sent)."""
        await self._add(
            keys=self._keys,
            args=[letter.id, letter.to_json(), repr(letter.at), max(1, keep), self.ttl],
        )
