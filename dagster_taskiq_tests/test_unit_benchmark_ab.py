"""The A/B driver's summary (``python -m benchmarks.ab``), on hand-made records (no network)."""

from pathlib import Path

import pytest

from benchmarks.ab import format_rows, main, summarize


def _run(build: str, round_no: int, scenario: str, executor: str, wall: float) -> dict:
    steps = 20 if scenario == "chain_20" else 102
    return {
        "type": "run", "build": build, "ab_round": round_no, "scenario": scenario,
        "executor": executor, "wall_s": wall, "steps": steps, "success": True,
    }  # fmt: skip


def test_ratios_are_taken_within_one_invocation() -> None:
    records = [
        # Round 0 on a quiet machine, round 1 on a busy one: the ratio stays 2x for "after".
        _run("after", 0, "chain_20", "in_process", 0.8),
        _run("after", 0, "chain_20", "taskiq_redis", 1.6),
        _run("after", 1, "chain_20", "in_process", 1.6),
        _run("after", 1, "chain_20", "taskiq_redis", 3.2),
        _run("before", 0, "chain_20", "in_process", 1.0),
        _run("before", 0, "chain_20", "taskiq_redis", 3.0),
        _run("before", 1, "fanout_100", "in_process", 4.0),
        _run("before", 1, "fanout_100", "taskiq_redis", 5.0),
    ]
    rows = {(r["build"], r["scenario"], r["executor"]): r for r in summarize(records)}
    after = rows[("after", "chain_20", "taskiq_redis")]
    assert after["ratio_fastest"] == after["ratio_median"] == pytest.approx(2.0)
    assert after["fastest_s"] == pytest.approx(1.6 / 20)  # per hop
    assert rows[("before", "chain_20", "taskiq_redis")]["ratio_median"] == pytest.approx(3.0)
    assert rows[("before", "fanout_100", "taskiq_redis")]["ratio_median"] == pytest.approx(1.25)
    assert rows[("before", "fanout_100", "in_process")]["ratio_median"] is None
    text = format_rows(summarize(records))
    assert "2.00×" in text and "(per hop)" in text
    assert format_rows(summarize(records), markdown=True).startswith("| build |")


def test_failed_runs_are_left_out_and_two_builds_are_needed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    failed = _run("after", 0, "chain_20", "taskiq_redis", 9.0) | {"success": False}
    assert summarize([failed]) == []
    with pytest.raises(SystemExit) as raised:
        main(["--build", "only=/tmp"])
    assert raised.value.code == 2
    assert "at least two" in capsys.readouterr().err


def test_targets_mode_puts_each_builds_figures_side_by_side(tmp_path: Path) -> None:
    from benchmarks.ab import format_targets, summarize_targets

    def records(build: str, hop: float) -> list[dict]:
        session = f"s-{build}"
        meta = {"type": "meta", "session": session, "storage": "sqlite",
                "executors": {"taskiq_redis": "x", "in_process": "y"}}  # fmt: skip
        extra = {"session": session, "cpu_s": 1.0}
        runs = [
            _run(build, 0, "chain_20", "in_process", 0.5) | extra,
            _run(build, 0, "chain_20", "taskiq_redis", 20 * hop) | extra,
        ]
        return [{**meta, "build": build}, *runs]

    rows = summarize_targets(records("before", 0.075) + records("after", 0.03))
    chain = {r["build"]: r for r in rows if r["target"].startswith("chain")}
    assert chain["before"]["fastest"] == pytest.approx(3.0)
    assert chain["after"]["fastest"] == pytest.approx(1.2)
    assert chain["after"]["storage"] == "sqlite"
    text = format_targets(rows)
    assert "before fastest" in text and "after median" in text
    line = next(line for line in text.splitlines() if "chain_20" in line)
    assert "3.00×" in line and "1.20×" in line and "MISSED" in line and "met" in line
    assert format_targets(rows, markdown=True).startswith("| storage | executor |")


def test_the_harness_command_of_each_mode(tmp_path: Path) -> None:
    import argparse

    from benchmarks.ab import harness_command

    args = argparse.Namespace(
        mode="targets", executors="taskiq_redis,in_process", scenarios="chain_20",
        harness_args="--storage sqlite --rounds 2",
    )  # fmt: skip
    out = str(tmp_path / "o.jsonl")
    command = harness_command(Path("/b/.venv/bin/python"), args, Path(out))
    assert command[:5] == ["/b/.venv/bin/python", "-m", "benchmarks", "run", "targets"]
    assert command[-6:] == ["--storage", "sqlite", "--rounds", "2", "--out", out]
    args.mode = "quick"
    assert "quick" in harness_command(Path("p"), args, tmp_path / "o.jsonl")
