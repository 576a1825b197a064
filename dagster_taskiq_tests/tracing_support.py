"""Tracing test support: an in-memory span exporter for this process, and a reader for the spans a
worker writes with ``OTEL_TRACES_EXPORTER=console``."""

import functools
import json
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@functools.cache
def in_memory_exporter() -> InMemorySpanExporter:
    """The exporter that receives every span this test process ends.

    OpenTelemetry lets a process install its global tracer provider once, so the first caller
    installs an SDK provider with this exporter and later callers share it. Tests pick their
    spans by attributes (run id, task id), never by count.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    installed = trace.get_tracer_provider()
    assert installed is provider, f"another tracer provider is installed: {installed!r}"
    return exporter


def hex_id(value: int | str, width: int) -> str:
    """A trace (``width`` 32) or span (16) id as lowercase hex without ``0x``."""
    if isinstance(value, int):
        return f"{value:0{width}x}"
    return value.lower().removeprefix("0x").zfill(width)


def console_spans(path: Path) -> list[dict[str, Any]]:
    """Every span that the SDK's console exporter has written to ``path`` so far.

    The exporter writes each span as an indented JSON object that starts with a line holding
    only ``{``; anything else in the file (a half-written span, other output) is skipped.
    """
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    decoder = json.JSONDecoder()
    spans: list[dict[str, Any]] = []
    position = 0
    while True:
        start = text.find("{\n", position)
        if start < 0:
            return spans
        if start > 0 and text[start - 1] != "\n":
            position = start + 1
            continue
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        if isinstance(value, dict) and "context" in value and "name" in value:
            spans.append(value)
        position = end
