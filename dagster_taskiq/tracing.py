"""OpenTelemetry tracing (optional extra ``otel``): ``enqueue`` and ``execute`` spans, with the
W3C trace context carried in the task message's labels.

This is the only module that imports OpenTelemetry. Without ``opentelemetry-api`` installed
every function here is a no-op: no labels are added, no spans are made. With the API but no
tracer provider configured, spans are non-recording and only an incoming context is passed on.

The trace context travels in the message's ``traceparent`` (and ``tracestate``) labels. They are
part of the message body that the key store registers, so the worker's digest check covers them;
the HMAC signature covers only the task id, name and argument, so they never affect it. A label
that is not a well-formed W3C value is ignored: the task then runs in a new trace.
"""

import contextlib
import importlib.metadata
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from dagster_taskiq.version import __version__

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _API = True
except ImportError:  # the ``otel`` extra is not installed
    _API = False

logger = logging.getLogger("dagster_taskiq")

__all__ = [
    "TRACEPARENT_LABEL",
    "TRACESTATE_LABEL",
    "ExecuteSpan",
    "activated",
    "available",
    "configure_from_environment",
    "current_context",
    "enqueue_span",
    "extract",
    "flush",
    "start_execute_span",
]

#: Message label that carries the W3C ``traceparent`` of the enqueue span.
TRACEPARENT_LABEL = "traceparent"
#: Message label that carries the W3C ``tracestate``, when there is one.
TRACESTATE_LABEL = "tracestate"
#: Name of the tracer (instrumentation scope) the spans are made with.
TRACER_NAME = "dagster_taskiq"
#: Longest label value read back (W3C caps ``tracestate`` at 512 characters).
_MAX_LABEL_CHARS = 512
#: Service name a worker reports when ``OTEL_SERVICE_NAME`` does not name one.
DEFAULT_WORKER_SERVICE_NAME = "dagster-taskiq-worker"
#: How long a task process waits for its spans to be exported before it exits.
CHILD_FLUSH_MILLIS = 5000

#: An OpenTelemetry ``Context`` (opaque here, so that callers need not import OpenTelemetry).
TraceContext = Any


def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (the ``otel`` extra)."""
    return _API


def current_context() -> TraceContext | None:
    """The calling thread's trace context, to hand to a coroutine run on another thread.

    The bridge runs coroutines on its own loop thread, where the caller's context is not
    current; the step handler and the launcher capture it with this and pass it on.
    """
    if not _API:
        return None
    return otel_context.get_current()


def _attributes(
    kind: str, run_id: str, step_key: str | None, queue: str, task_id: str
) -> dict[str, str]:
    attributes = {
        "messaging.system": "taskiq",
        "dagster_taskiq.kind": kind,
        "dagster.run_id": run_id,
        "dagster_taskiq.queue": queue,
        "dagster_taskiq.task_id": task_id,
    }
    if step_key is not None:
        attributes["dagster.step_key"] = step_key
    return attributes


@contextlib.contextmanager
def enqueue_span(
    *,
    parent: TraceContext | None,
    kind: str,
    run_id: str,
    step_key: str | None,
    queue: str,
    task_id: str,
) -> Iterator[dict[str, str]]:
    """An ``enqueue`` span around sending one task; yields the trace labels for its message.

    ``parent`` is the sender's context (see :func:`current_context`); None uses the current
    one. The yielded dict is empty when there is nothing to propagate.
    """
    if not _API:
        yield {}
        return
    tracer = otel_trace.get_tracer(TRACER_NAME, __version__)
    with tracer.start_as_current_span(
        "enqueue",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes=_attributes(kind, run_id, step_key, queue, task_id),
    ):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        yield {
            key: value
            for key, value in carrier.items()
            if key in (TRACEPARENT_LABEL, TRACESTATE_LABEL) and isinstance(value, str)
        }


def extract(labels: object) -> TraceContext | None:
    """The sender's trace context from a message's labels, or None.

    Only string values of bounded length are read; a missing, malformed or forged
    ``traceparent`` gives None (the task then starts a new trace). Never raises.
    """
    if not _API or not isinstance(labels, Mapping):
        return None
    carrier: dict[str, str] = {}
    for key in (TRACEPARENT_LABEL, TRACESTATE_LABEL):
        value = labels.get(key)
        if isinstance(value, str) and len(value) <= _MAX_LABEL_CHARS:
            carrier[key] = value
    if TRACEPARENT_LABEL not in carrier:
        return None
    try:
        context = TraceContextTextMapPropagator().extract(carrier)
        valid = otel_trace.get_current_span(context).get_span_context().is_valid
    except Exception as exc:  # a propagator must not take the worker down
        logger.debug("Ignoring an unreadable trace context (%s).", exc)
        return None
    return context if valid else None


class ExecuteSpan:
    """The ``execute`` span of one task: started when its process is forked, ended when the
    worker has recorded its outcome."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def context(self) -> TraceContext | None:
        """A context with this span current (for the task process's own spans), or None."""
        if self._span is None:
            return None
        return otel_trace.set_span_in_context(self._span)

    def end(self, outcome: str, message: str | None = None) -> None:
        """Record the task's outcome (``success`` or anything else) and end the span.

        Never raises."""
        if self._span is None:
            return
        try:
            self._span.set_attribute("dagster_taskiq.outcome", outcome)
            if outcome != "success":
                self._span.set_status(Status(StatusCode.ERROR, message or outcome))
            self._span.end()
        except Exception as exc:  # tracing must never disturb finishing a task
            logger.warning("Could not end an execute span (%s).", exc)


def start_execute_span(
    parent: TraceContext | None,
    *,
    kind: str,
    run_id: str,
    step_key: str | None,
    queue: str,
    task_id: str,
    worker: str,
) -> ExecuteSpan:
    """Start the ``execute`` span of a task as a child of its sender's ``parent`` context."""
    if not _API:
        return ExecuteSpan(None)
    attributes = _attributes(kind, run_id, step_key, queue, task_id)
    attributes["dagster_taskiq.worker"] = worker
    tracer = otel_trace.get_tracer(TRACER_NAME, __version__)
    # An explicit empty context when there is no parent: never the worker loop's current one.
    span = tracer.start_span(
        "execute",
        context=parent if parent is not None else otel_context.Context(),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )
    return ExecuteSpan(span)


@contextlib.contextmanager
def activated(context: TraceContext | None) -> Iterator[None]:
    """Make ``context`` current for the duration (in a task process: its execute span)."""
    if not _API or context is None:
        yield
        return
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def flush(timeout_millis: int = CHILD_FLUSH_MILLIS) -> None:
    """Export the spans this process has ended (a task process calls it before ``os._exit``)."""
    if not _API:
        return
    force_flush = getattr(otel_trace.get_tracer_provider(), "force_flush", None)
    if force_flush is None:
        return
    try:
        force_flush(timeout_millis)
    except Exception as exc:
        logger.warning("Could not export trace spans before exit (%s).", exc)


def configure_from_environment(
    default_service_name: str = DEFAULT_WORKER_SERVICE_NAME,
) -> str | None:
    """Install an SDK tracer provider from the standard ``OTEL_*`` environment, if asked to.

    Acts when ``OTEL_TRACES_EXPORTER`` or ``OTEL_SERVICE_NAME`` is set, ``opentelemetry-sdk``
    is installed and no tracer provider is installed yet. The exporters are the entry points
    named by ``OTEL_TRACES_EXPORTER`` (default ``otlp``; ``console`` ships with the SDK). The
    resource comes from ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, and batching from
    ``OTEL_BSP_*``. Returns a one-line description of what it set up, or None.
    """
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names and not os.environ.get("OTEL_SERVICE_NAME"):
        return None
    if names.lower() == "none":
        return None
    if not _API:
        logger.warning(
            "OTEL_* tracing is configured but OpenTelemetry is not installed; install "
            "'dagster-taskiq[otel]' and opentelemetry-sdk to export spans."
        )
        return None
    if not isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider):
        return "the tracer provider already installed in this process"
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning(
            "OTEL_* tracing is configured but opentelemetry-sdk is not installed; "
            "pip install opentelemetry-sdk (and the exporter you name) to export spans."
        )
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    provider = TracerProvider(resource=resource)
    configured = []
    for name in [part.strip() for part in (names or "otlp").split(",") if part.strip()]:
        found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            logger.warning(
                "OTEL_TRACES_EXPORTER names '%s', but no installed package provides that span "
                "exporter (for 'otlp': pip install opentelemetry-exporter-otlp); skipping it.",
                name,
            )
            continue
        exporter = next(iter(found)).load()()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        configured.append(name)
    if not configured:
        return None
    otel_trace.set_tracer_provider(provider)
    service = resource.attributes.get(SERVICE_NAME)
    return f"OpenTelemetry tracing: service '{service}', exporter {', '.join(configured)}"
