"""A delivered message that remembers which queue it came from."""

from taskiq import AckableMessage


class Delivery(AckableMessage):
    """An :class:`~taskiq.AckableMessage` plus the name of the queue it was taken from.

    Workers record that queue with a message they dead-letter, so that an operator can see where
    it came from and ``dead-letters replay`` can put it back there.
    """

    queue: str | None = None
    #: Set when RabbitMQ dead-lettered this message (a quorum queue's delivery limit): why. The
    #: worker records it as a dead letter from ``queue`` and never runs it.
    dead_letter_reason: str | None = None
