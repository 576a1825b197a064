"""Example Dagster code for dagster-taskiq: a daily sales pipeline on two taskiq queues."""

from sales_pipeline.definitions import daily_sales, defs

__all__ = ["daily_sales", "defs"]
