"""``python -m benchmarks run|report|hops``: the dagster-taskiq benchmark command line."""

import argparse
import datetime
import json
import signal
import sys
from pathlib import Path
from typing import Any

from benchmarks.lanes import LANE_VARIANTS
from benchmarks.report import DERIVED_TYPES, format_markdown, format_text, summarize
from benchmarks.scenarios import MODES, SCENARIOS

#: Kept here (not imported from benchmarks.env) so that ``report`` does not import Dagster.
EXECUTOR_NAMES = ("taskiq_redis", "taskiq_rabbitmq", "in_process", "multiprocess", "celery_redis")
#: ``--metrics`` adds, for each taskiq executor, this variant whose workers serve metrics.
METRICS_SUFFIX = "_metrics"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _ints(value: str) -> list[int]:
    return [int(part) for part in _csv(value)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start brokers and workers, run scenarios, write JSON lines")
    run.add_argument("mode", nargs="?", choices=sorted([*MODES, "scale"]), default="quick")
    run.add_argument(
        "--scenarios", type=_csv, default=None, help=f"comma-separated: {', '.join(SCENARIOS)}"
    )
    run.add_argument(
        "--executors",
        type=_csv,
        default=None,
        help=f"comma-separated: {', '.join(EXECUTOR_NAMES + LANE_VARIANTS)} (default: the "
        "mode's, else all but the quorum variants, which run lanes compares)",
    )
    run.add_argument("--rounds", type=int, default=None, help="measured rounds per scenario")
    run.add_argument(
        "--probe-rounds",
        type=int,
        default=None,
        help="rounds of the cold-start probe (fresh worker start-up, first step, worker PSS); "
        "default: the mode's (targets 3, smoke 1, else 0)",
    )
    run.add_argument("--no-warmup", action="store_true", help="skip the unmeasured first round")
    run.add_argument(
        "--no-skip", action="store_true", help="also run executor/scenario pairs skipped as slow"
    )
    run.add_argument(
        "--metrics",
        action="store_true",
        help="also run each taskiq executor with workers started with --metrics-port (as "
        "<executor>_metrics), to measure the metrics' cost on and off in one run",
    )
    run.add_argument("--workers", type=int, default=2, help="workers per executor (default 2)")
    run.add_argument(
        "--concurrency", type=int, default=None, help="slots per worker (default 1; scale: 2)"
    )
    run.add_argument(
        "--scale-workers",
        type=_ints,
        default=[2, 4, 8],
        help="scale mode: comma-separated worker counts, each measured on its own (default 2,4,8)",
    )
    run.add_argument(
        "--scale-runs", type=int, default=100, help="scale mode: runs launched at once (100)"
    )
    run.add_argument(
        "--scale-steps", type=int, default=20, help="scale mode: ops in each run's chain (20)"
    )
    run.add_argument(
        "--poll-interval", type=float, default=None, help="taskiq_executor poll_interval override"
    )
    run.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    run.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    run.add_argument(
        "--storage",
        type=_csv,
        default=None,
        help="Dagster instance storage, comma-separated: sqlite (as in the baseline) and/or "
        "postgres (a fresh database per executor, dropped at the end; needs dagster-postgres); "
        "each is a session of its own, one after the other, into one file. Default: the mode's "
        "(targets: sqlite,postgres; else sqlite)",
    )
    run.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    run.add_argument("--celery-db", type=int, default=3, help="Redis database for dagster-celery")
    run.add_argument("--out", type=Path, default=None, help="JSON lines file to write")
    run.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    run.add_argument(
        "--worker-loglevel",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the taskiq workers' --loglevel (DEBUG logs each run's preparation time)",
    )
    run.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    hops = sub.add_parser(
        "hops", help="where a hop's time goes, from a kept DAGSTER_HOME (run --keep)"
    )
    hops.add_argument("home", type=Path, help="an executor's DAGSTER_HOME under the kept folder")
    hops.add_argument("--run-id", default=None, help="this run instead of the newest")
    hops.add_argument(
        "--slots", type=int, default=None, help="also split a run of independent steps by slot"
    )
    report = sub.add_parser("report", help="summarize a JSON lines file again")
    report.add_argument("path", type=Path)
    report.add_argument("--markdown", action="store_true")
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so workers and private brokers are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.command == "hops":
        from benchmarks.hops import breakdown_of

        print(breakdown_of(args.home, args.run_id, args.slots))
        return 0
    if args.command == "report":
        stored = [json.loads(line) for line in args.path.read_text().splitlines() if line]
        # Summaries, targets and the scaling verdict are computed again from the raw records, so
        # an old file is judged by the current criteria.
        if any(r.get("type") == "scale" for r in stored):
            from benchmarks.scalestats import format_scale

            print(format_scale(stored, markdown=args.markdown))
            return 0
        raw = [r for r in stored if r.get("type") not in DERIVED_TYPES]
        raw += summarize(raw)
        print(format_text(raw))
        if args.markdown:
            print()
            print(format_markdown(raw))
        return 0
    if args.mode == "scale":
        return _run_scale(args)
    if args.concurrency is None:
        args.concurrency = 1
    mode = MODES[args.mode]
    scenario_names = args.scenarios or list(mode.scenarios)
    unknown = [s for s in scenario_names if s not in SCENARIOS]
    executors = args.executors or list(mode.executors or EXECUTOR_NAMES)
    unknown += [e for e in executors if e not in EXECUTOR_NAMES + LANE_VARIANTS]
    storages = args.storage or list(mode.storages)
    unknown += [s for s in storages if s not in ("sqlite", "postgres")]
    if unknown:
        _parser().error(f"unknown scenario, executor or storage: {', '.join(unknown)}")
    if args.metrics:
        executors += [f"{e}{METRICS_SUFFIX}" for e in executors if e.startswith("taskiq_")]
    rounds = args.rounds if args.rounds is not None else mode.rounds
    probe_rounds = args.probe_rounds if args.probe_rounds is not None else mode.probe_rounds
    out_path = args.out
    if out_path is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_path = RESULTS_DIR / f"{stamp}-{args.mode}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from benchmarks.env import EXECUTORS, BenchEnv
    from benchmarks.runner import Session

    variants = {f"{e}{METRICS_SUFFIX}" for e in EXECUTOR_NAMES if e.startswith("taskiq_")}
    assert set(EXECUTORS) == set(EXECUTOR_NAMES) | variants | set(LANE_VARIANTS)
    records: list[dict[str, Any]] = []
    with open(out_path, "w", encoding="utf-8") as out:
        for storage in storages:
            env = BenchEnv(
                executors,
                redis_url=args.redis_url,
                amqp_url=args.amqp_url,
                celery_db=args.celery_db,
                workers=args.workers,
                concurrency=args.concurrency,
                poll_interval=args.poll_interval,
                storage=storage,
                postgres_url=args.postgres_url,
                keep=args.keep,
                worker_loglevel=args.worker_loglevel,
                log=_log,
            )
            _log(f"== {storage} storage")
            session = Session(
                env,
                [SCENARIOS[name] for name in scenario_names],
                rounds,
                out,
                mode=args.mode,
                no_skip=args.no_skip,
                warmup=mode.warmup and not args.no_warmup,
                probe_rounds=probe_rounds,
                log=_log,
                run_probe=_broker_probe if args.mode == "lanes" else None,
            )
            records += session.run()
    print(format_text(records))
    if args.markdown:
        print()
        print(format_markdown(records))
    _log(f"\nJSON lines: {out_path}")
    failed = [
        r for r in records if r.get("type") in ("run", "cold_start") and not r.get("success")
    ]
    return 1 if failed else 0


def _broker_probe(env: Any) -> Any:
    """``run lanes``: RabbitMQ's queue and packet counters for the session's RabbitMQ executors."""
    from benchmarks.lanes import BrokerProbe

    return BrokerProbe(env.rabbit_executors(), log=_log)


def _run_scale(args: argparse.Namespace) -> int:
    from benchmarks.scale import ScaleBench, ScaleSpec
    from benchmarks.scalestats import format_scale

    storages = args.storage or ["postgres"]
    if len(storages) != 1 or storages[0] not in ("sqlite", "postgres"):
        _parser().error("scale mode takes one --storage: postgres (default) or sqlite")
    if not args.scale_workers or min(args.scale_workers) < 1:
        _parser().error("--scale-workers needs positive worker counts, e.g. 2,4,8")
    if args.scale_runs < 1 or args.scale_steps < 1:
        _parser().error("--scale-runs and --scale-steps must be at least 1")
    spec = ScaleSpec(
        worker_counts=tuple(sorted(set(args.scale_workers))),
        slots=args.concurrency or 2,
        runs=args.scale_runs,
        steps=args.scale_steps,
        storage=storages[0],
        postgres_url=args.postgres_url,
        warmup=not args.no_warmup,
        keep=args.keep,
    )
    out_path = args.out
    if out_path is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_path = RESULTS_DIR / f"{stamp}-scale.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as out:
        records = ScaleBench(spec, out, log=_log).run()
    print(format_scale(records))
    if args.markdown:
        print()
        print(format_scale(records, markdown=True))
    _log(f"\nJSON lines: {out_path}")
    scale = [r for r in records if r.get("type") == "scale"]
    return 0 if all(r.get("success") for r in scale) else 1


if __name__ == "__main__":
    sys.exit(main())
