"""HMAC-SHA256 signatures on task messages (optional, ``signing_key``).

The signature covers the task id, the task name and the one serdes argument, and travels in the
message's ``signature`` label. A worker with a signing key refuses a message whose signature is
missing or wrong; the key store's digest check (registered code only) applies either way.
"""

import hashlib
import hmac

#: Message label that carries the signature.
SIGNATURE_LABEL = "signature"


def sign(key: str, task_id: str, task_name: str, payload: str) -> str:
    """The hex HMAC-SHA256 of a task's id, name and argument under ``key``."""
    body = b"\x00".join(part.encode() for part in (task_id, task_name, payload))
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def verify(key: str, task_id: str, task_name: str, payload: str, signature: object) -> bool:
    """Whether ``signature`` is the right one for this task under ``key`` (constant time)."""
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(key, task_id, task_name, payload), signature)
