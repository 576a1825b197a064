"""Prometheus metrics and health endpoints: the worker's ``--metrics-port`` and the exporter.

Everything here is built per process around its own ``CollectorRegistry``; nothing registers
in ``prometheus_client``'s global registry.
"""
