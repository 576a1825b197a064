"""``python -m benchmarks.ab``: compare builds (checkouts) of dagster-taskiq in one interleaved run.

Each build is a checkout with its own virtualenv (``DIR/.venv``) and its own ``benchmarks``
harness. Per round, every build runs its harness once (``run quick`` with the given scenarios and
executors, one measured round after its unmeasured warm-up), the builds' order alternating from
round to round, so that a drift of the machine's load falls on all of them alike. Each
invocation measures the taskiq executor and ``in_process`` side by side, so the ratio of the two
within one invocation is the figure least touched by the machine's noise.

Example (before and after a change, four rounds)::

    python -m benchmarks.ab --build before=/tmp/base --build after=. \\
        --scenarios chain_20,fanout_100 --rounds 4 --out ab.jsonl

Prints, per build, scenario and executor, the fastest and the median wall time, and the fastest
and the median of the per-invocation ratio to ``in_process`` (``chain_20`` per hop). Every raw
record goes to ``--out`` with its build and round added. ``--report FILE`` prints the table of a
file again.

``--mode targets`` runs ``run targets`` instead (every row of the performance targets, with the
cold-start probe; ``--harness-args`` passes e.g. ``--storage sqlite --rounds 2``) and prints the
targets table with one column pair per build. ``--harness DIR`` makes every build run the
harness of the checkout ``DIR`` (copied to a temporary folder, so each build's own installed
package is the one measured): an old build whose harness lacks a mode is measured by the same
code as the new one.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.tables import render_table

#: The executor every ratio is taken against.
BASELINE = "in_process"
#: Harness modes that measure the targets table (``smoke``: the same at tiny sizes).
TARGET_MODES = ("targets", "smoke")


def _build(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, Path(path).resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    parser.add_argument("--build", type=_build, action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--mode", choices=("quick", *TARGET_MODES), default="quick")
    parser.add_argument(
        "--harness",
        type=Path,
        default=None,
        metavar="DIR",
        help="run this checkout's benchmarks/ for every build (default: each build's own)",
    )
    parser.add_argument(
        "--harness-args", default="", help="more arguments for the harness's run command"
    )
    parser.add_argument("--scenarios", default="chain_20,fanout_100")
    parser.add_argument("--executors", default=f"taskiq_redis,{BASELINE}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file to write")
    parser.add_argument("--report", type=Path, default=None, help="print the table of a file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def harness_command(python: Path, args: argparse.Namespace, out: Path) -> list[str]:
    """The harness's run command for one invocation of a build."""
    if args.mode in TARGET_MODES:
        command = [str(python), "-m", "benchmarks", "run", args.mode, "--executors", args.executors]
    else:
        command = [
            str(python), "-m", "benchmarks", "run", "quick",
            "--scenarios", args.scenarios, "--executors", args.executors, "--rounds", "1",
        ]  # fmt: skip
    return [*command, *shlex.split(args.harness_args), "--out", str(out)]


def run_once(name: str, checkout: Path, args: argparse.Namespace, round_no: int) -> list[dict]:
    """One invocation of a harness for the build in ``checkout``; its records, tagged.

    Quick mode keeps the measured run records; targets mode keeps every raw record (the targets
    table needs the sessions, the probes and the CPU figures too).
    """
    python = checkout / ".venv" / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="dagster-taskiq-ab-") as tmp:
        out = Path(tmp) / "records.jsonl"
        cwd = checkout
        if args.harness is not None:
            # Only the harness in the working folder: ``dagster_taskiq`` is the build's install.
            cwd = Path(tmp) / "harness"
            shutil.copytree(
                args.harness / "benchmarks",
                cwd / "benchmarks",
                ignore=shutil.ignore_patterns("results", "__pycache__"),
            )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DAGSTER_HOME")}
        _log(f"round {round_no}: {name} ({checkout})")
        done = subprocess.run(
            harness_command(python, args, out), cwd=cwd, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in out.read_text().splitlines() if line]
    load = next((r.get("machine", {}) for r in records if r.get("type") == "meta"), {})
    commit = _commit_of(checkout)
    if args.mode in TARGET_MODES:
        kept = records
    else:
        kept = [r for r in records if r.get("type") == "run" and not r.get("warmup")]
    for record in kept:
        record.update(
            build=name,
            build_commit=commit,
            ab_round=round_no,
            loadavg=load.get("loadavg_at_start"),
        )
    return kept


def _commit_of(checkout: Path) -> str:
    """The checkout's commit, or ``""`` when it is not a git checkout."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def _per_unit(record: dict) -> float:
    """Wall time, per hop for chains (``wall / steps``), else per run."""
    wall = float(record["wall_s"])
    return wall / int(record["steps"]) if str(record["scenario"]).startswith("chain") else wall


def summarize(records: list[dict]) -> list[dict[str, Any]]:
    """Rows: build, scenario, executor, fastest and median time, fastest and median ratio."""
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    by_invocation: dict[tuple[str, int, str], dict[str, float]] = defaultdict(dict)
    for record in records:
        if not record.get("success", True):
            continue
        key = (record["build"], record["scenario"], record["executor"])
        value = _per_unit(record)
        times[key].append(value)
        by_invocation[(record["build"], record["ab_round"], record["scenario"])][
            record["executor"]
        ] = value
    ratios: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for (build, _round, scenario), values in by_invocation.items():
        base = values.get(BASELINE)
        for executor, value in values.items():
            if base and executor != BASELINE:
                ratios[(build, scenario, executor)].append(value / base)
    rows = []
    for (build, scenario, executor), values in sorted(times.items()):
        found = ratios.get((build, scenario, executor), [])
        rows.append(
            {
                "build": build,
                "scenario": scenario,
                "executor": executor,
                "n": len(values),
                "fastest_s": min(values),
                "median_s": statistics.median(values),
                "ratio_fastest": min(found) if found else None,
                "ratio_median": statistics.median(found) if found else None,
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The summary as aligned text or as a Markdown table."""

    def ms(value: float) -> str:
        return f"{value * 1000:.1f} ms"

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    header = ["build", "scenario", "executor", "n", "fastest", "median", "÷ in-process fastest",
              "÷ in-process median"]  # fmt: skip
    lines = [
        [r["build"], r["scenario"] + (" (per hop)" if r["scenario"].startswith("chain") else ""),
         r["executor"], str(r["n"]), ms(r["fastest_s"]), ms(r["median_s"]),
         ratio(r["ratio_fastest"]), ratio(r["ratio_median"])]
        for r in rows
    ]  # fmt: skip
    return render_table(header, lines, markdown)


def summarize_targets(records: list[dict]) -> list[dict[str, Any]]:
    """The targets rows of each build (per storage), from every build's raw targets records."""
    from benchmarks.report import by_storage
    from benchmarks.targets import target_rows

    rows: list[dict[str, Any]] = []
    for build in dict.fromkeys(record["build"] for record in records):
        mine = [r for r in records if r["build"] == build]
        for storage, part in by_storage(mine).items():
            rows += [{**row, "build": build, "storage": storage} for row in target_rows(part)]
    return rows


def format_targets(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """One line per storage, executor and target; per build its fastest and median figures."""
    from benchmarks.targets import format_value, verdict

    builds = list(dict.fromkeys(row["build"] for row in rows))
    lines: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        key = (row["storage"], row["executor"], row["label"])
        lines.setdefault(key, {})[row["build"]] = row
    header = ["storage", "executor", "target"]
    for build in builds:
        header += [f"{build} fastest", f"{build} median", f"{build}"]
    header.append("limit")
    table = []
    for (storage, executor, label), found in lines.items():
        line = [storage, executor, label]
        limit = ""
        for build in builds:
            row = found.get(build)
            if row is None:
                line += ["-", "-", "not measured"]
                continue
            limit = "≤ " + format_value(row["limit"], row["unit"])
            line += [
                format_value(row["fastest"], row["unit"]),
                format_value(row["median"], row["unit"]),
                verdict(row),
            ]
        table.append([*line, limit])
    return render_table(header, table, markdown)


def _print_table(records: list[dict], mode: str, markdown: bool) -> None:
    if mode in TARGET_MODES or any(r.get("type") == "meta" for r in records):
        print(format_targets(summarize_targets(records), markdown))
    else:
        print(format_rows(summarize(records), markdown))


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    if args.report is not None:
        records = [json.loads(line) for line in args.report.read_text().splitlines() if line]
        _print_table(records, args.mode, args.markdown)
        return 0
    if len(args.build) < 2:
        _parser().error("give at least two --build NAME=DIR")
    records: list[dict] = []
    for round_no in range(args.rounds):
        order = args.build if round_no % 2 == 0 else list(reversed(args.build))
        for name, checkout in order:
            found = run_once(name, checkout, args, round_no)
            records += found
            if args.out is not None:
                with args.out.open("a") as handle:
                    for record in found:
                        handle.write(json.dumps(record) + "\n")
    _print_table(records, args.mode, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
