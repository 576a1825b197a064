"""A daily sales pipeline whose steps run on taskiq workers, on two queues with priorities.

::

    extract_orders ─┬─> revenue_by_region  (queue compute, priority 9) ─┐
     (dagster, 5)   ├─> top_products       (queue compute, priority 6) ─┤
                    ├─> customer_segments  (queue compute, priority 3) ─┼─> build_report
                    └─> validate_orders    (queue dagster, priority 8) ─┘    (dagster, 5)

``extract_orders`` makes a deterministic batch of synthetic orders (about 1 % of them invalid, as
real feeds are). The three transforms are CPU work and go to the ``compute`` queue; the light
steps stay on the default ``dagster`` queue. ``validate_orders`` is a data-quality gate: the run
fails when the share of invalid orders is above ``max_invalid_ratio``.
"""

import random
from collections import Counter, defaultdict
from typing import NamedTuple

from dagster import (
    Config,
    DefaultScheduleStatus,
    Definitions,
    Failure,
    MetadataValue,
    OpExecutionContext,
    Output,
    ScheduleDefinition,
    job,
    op,
)

from dagster_taskiq import taskiq_executor

QUEUE = "dagster-taskiq/queue"
PRIORITY = "dagster-taskiq/priority"

REGIONS = ("EU", "US", "APAC", "LATAM")
PRODUCTS = tuple(f"SKU-{n:03d}" for n in range(1, 41))


class Order(NamedTuple):
    """One order line. ``region`` is empty and ``quantity`` may be negative in invalid rows."""

    order_id: int
    customer: str
    region: str
    product: str
    quantity: int
    unit_price: float

    @property
    def valid(self) -> bool:
        """Whether the row can be used for revenue figures."""
        return bool(self.region) and self.quantity > 0

    @property
    def amount(self) -> float:
        """Line revenue."""
        return self.quantity * self.unit_price


class QualityReport(NamedTuple):
    """What the data-quality gate found."""

    orders: int
    invalid: int
    invalid_ratio: float


class ExtractConfig(Config):
    """How many orders to extract, and the seed that makes the batch reproducible."""

    orders: int = 20_000
    seed: int = 7


class QualityConfig(Config):
    """Largest share of invalid orders the pipeline accepts."""

    max_invalid_ratio: float = 0.05


@op(tags={QUEUE: "dagster", PRIORITY: "5"})
def extract_orders(context: OpExecutionContext, config: ExtractConfig) -> Output[list[Order]]:
    """Extract the day's orders (synthetic and deterministic, standing in for a source system)."""
    rng = random.Random(config.seed)
    prices = {product: round(rng.uniform(2.0, 250.0), 2) for product in PRODUCTS}
    orders = []
    for order_id in range(config.orders):
        product = rng.choice(PRODUCTS)
        broken = rng.random() < 0.01
        orders.append(
            Order(
                order_id=order_id,
                customer=f"C{rng.randrange(5_000):05d}",
                region="" if broken and order_id % 2 else rng.choice(REGIONS),
                product=product,
                quantity=-1 if broken and not order_id % 2 else rng.randint(1, 12),
                unit_price=prices[product],
            )
        )
    context.log.info(f"Extracted {len(orders)} orders.")
    return Output(orders, metadata={"orders": len(orders)})


@op(tags={QUEUE: "compute", PRIORITY: "9"})
def revenue_by_region(orders: list[Order]) -> dict[str, float]:
    """Revenue per region, from valid orders."""
    totals: dict[str, float] = defaultdict(float)
    for order in orders:
        if order.valid:
            totals[order.region] += order.amount
    return {region: round(total, 2) for region, total in sorted(totals.items())}


@op(tags={QUEUE: "compute", PRIORITY: "6"})
def top_products(orders: list[Order]) -> list[tuple[str, float]]:
    """The ten products with the most revenue."""
    totals: Counter[str] = Counter()
    for order in orders:
        if order.valid:
            totals[order.product] += order.amount
    return [(product, round(total, 2)) for product, total in totals.most_common(10)]


@op(tags={QUEUE: "compute", PRIORITY: "3"})
def customer_segments(orders: list[Order]) -> dict[str, int]:
    """How many customers fall in each spend segment."""
    spend: dict[str, float] = defaultdict(float)
    for order in orders:
        if order.valid:
            spend[order.customer] += order.amount
    segments: Counter[str] = Counter()
    for total in spend.values():
        segments["gold" if total >= 10_000 else "silver" if total >= 3_000 else "bronze"] += 1
    return dict(sorted(segments.items()))


@op(tags={QUEUE: "dagster", PRIORITY: "8"})
def validate_orders(
    context: OpExecutionContext, config: QualityConfig, orders: list[Order]
) -> QualityReport:
    """Fail the run when more orders are invalid than ``max_invalid_ratio`` allows."""
    invalid = sum(1 for order in orders if not order.valid)
    ratio = invalid / max(1, len(orders))
    if ratio > config.max_invalid_ratio:
        raise Failure(
            description=f"{invalid} of {len(orders)} orders are invalid ({ratio:.2%}), above "
            f"the allowed {config.max_invalid_ratio:.2%}.",
            metadata={"invalid": invalid, "ratio": ratio},
        )
    context.log.info(f"{invalid} invalid orders ({ratio:.2%}); within the limit.")
    return QualityReport(orders=len(orders), invalid=invalid, invalid_ratio=round(ratio, 4))


@op(tags={QUEUE: "dagster", PRIORITY: "5"})
def build_report(
    context: OpExecutionContext,
    revenue: dict[str, float],
    products: list[tuple[str, float]],
    segments: dict[str, int],
    quality: QualityReport,
) -> Output[dict[str, object]]:
    """Combine the transforms into the daily report."""
    lines = ["| region | revenue |", "|---|---|"]
    lines += [f"| {region} | {total:,.2f} |" for region, total in revenue.items()]
    report = {
        "revenue": revenue,
        "total_revenue": round(sum(revenue.values()), 2),
        "top_products": products[:3],
        "segments": segments,
        "quality": quality._asdict(),
    }
    context.log.info(f"Total revenue {report['total_revenue']:,.2f}.")
    return Output(
        report,
        metadata={
            "total_revenue": report["total_revenue"],
            "revenue_by_region": MetadataValue.md("\n".join(lines)),
        },
    )


@job(executor_def=taskiq_executor, tags={QUEUE: "dagster"})
def daily_sales() -> None:
    """Extract orders, transform them in parallel on the compute queue, and build the report."""
    orders = extract_orders()
    build_report(
        revenue_by_region(orders),
        top_products(orders),
        customer_segments(orders),
        validate_orders(orders),
    )


daily_sales_schedule = ScheduleDefinition(
    job=daily_sales,
    cron_schedule="0 6 * * *",
    default_status=DefaultScheduleStatus.STOPPED,
)

defs = Definitions(jobs=[daily_sales], schedules=[daily_sales_schedule])
