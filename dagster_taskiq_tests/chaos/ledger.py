"""The execution ledger: what ran, where, and when — written by the ops themselves.

An op runs in a worker's forked child, so it cannot report to the test through memory. Instead
each execution of an op body appends two JSON lines to one file:

* ``{"ev": "start", "exec": ID, "run_id", "step_key", "attempt", "pid", "ppid", "proc_start",
  "host", "worker"?, "t"}`` when the body starts, and
* ``{"ev": "end", "exec": ID, "outcome", "t"}`` when it ends (returned, raised, interrupted).

Each line is written with a single ``write`` on a descriptor opened with ``O_APPEND`` and is
shorter than 4 KiB, so lines from concurrent processes never interleave.

An execution whose process was killed has no end line. :class:`DeathWatch` polls the processes
of open executions and records the time it first saw each one dead; the reader uses that time as
the execution's end (an upper bound: conservative for the overlap check). Without an observed
death the end is ``+inf``, which is conservative too.

``proc_start`` (the process start time from ``/proc/PID/stat``) guards against pid reuse.
"""

import contextlib
import dataclasses
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

#: Environment variable naming the ledger file (op config takes precedence).
LEDGER_ENV = "DAGSTER_TASKIQ_CHAOS_LEDGER"
#: Environment variable the chaos harness sets on each worker: the worker's name.
WORKER_ENV = "DAGSTER_TASKIQ_CHAOS_WORKER"
#: Lines must stay below this size for ``O_APPEND`` writes to be atomic.
MAX_LINE_BYTES = 4096


# -- processes -----------------------------------------------------------------------------
def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of ``/proc/PID/stat``)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """Whether ``pid`` still runs (not a zombie) and is the process that started at
    ``proc_start`` (when given)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = raw[raw.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return False
    if proc_start is not None:
        try:
            return int(fields[19]) == proc_start
        except (IndexError, ValueError):
            return True
    return True


# -- writing -------------------------------------------------------------------------------
def append(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line, atomically (one ``write``, ``O_APPEND``, < 4 KiB)."""
    line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
    if len(line) >= MAX_LINE_BYTES:
        raise ValueError(f"ledger line of {len(line)} bytes is too long to append atomically")
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
    finally:
        os.close(fd)
    if written != len(line):
        raise OSError(f"short ledger write: {written} of {len(line)} bytes")


@contextlib.contextmanager
def record_execution(
    path: str | os.PathLike[str], *, run_id: str, step_key: str, attempt: int
) -> Iterator[str]:
    """Write the start line, run the body, write the end line (also when the body raises or is
    interrupted). Yields the execution id."""
    exec_id = uuid.uuid4().hex
    pid = os.getpid()
    start: dict[str, Any] = {
        "ev": "start",
        "exec": exec_id,
        "run_id": run_id,
        "step_key": step_key,
        "attempt": attempt,
        "pid": pid,
        "ppid": os.getppid(),
        "proc_start": proc_start_ticks(pid),
        "host": socket.gethostname(),
        "t": time.time(),
    }
    worker = os.environ.get(WORKER_ENV)
    if worker:
        start["worker"] = worker
    append(path, start)
    outcome = "returned"
    try:
        yield exec_id
    except BaseException as exc:
        outcome = f"raised:{type(exc).__name__}"
        raise
    finally:
        append(path, {"ev": "end", "exec": exec_id, "outcome": outcome, "t": time.time()})


# -- reading -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Execution:
    """One execution of an op body, as the ledger (and the death watch) saw it."""

    exec_id: str
    run_id: str
    step_key: str
    attempt: int
    pid: int
    ppid: int
    host: str
    worker: str | None
    proc_start: int | None
    start: float
    #: When the body ended: its end line, else when its process was seen dead, else +inf.
    end: float
    #: ``returned``, ``raised:<Exception>``, ``died`` (seen dead, no end line) or ``open``.
    outcome: str

    @property
    def finished(self) -> bool:
        """Whether the execution has a known end."""
        return math.isfinite(self.end)

    def describe(self, origin: float = 0.0) -> str:
        """``attempt 1 (pid 123 on worker w-a, 3.21-5.60 s, returned)``; times from ``origin``."""
        where = f"worker {self.worker}" if self.worker else f"ppid {self.ppid}"
        end = f"{self.end - origin:.2f}" if self.finished else "inf"
        return (
            f"attempt {self.attempt} (pid {self.pid} on {where}, "
            f"{self.start - origin:.2f}-{end} s, {self.outcome})"
        )


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete line of the ledger, parsed (a torn last line is skipped)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is incomplete
        if line.strip():
            records.append(json.loads(line))
    return records


def read_executions(
    path: str | os.PathLike[str], deaths: Mapping[str, float] | None = None
) -> list[Execution]:
    """Pair start and end lines into executions, ordered by start time.

    An execution without an end line ends when ``deaths`` says its process was seen dead;
    otherwise at ``+inf`` (outcome ``open``).
    """
    starts: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    for record in read_records(path):
        (starts if record.get("ev") == "start" else ends)[record["exec"]] = record
    executions = []
    for exec_id, start in starts.items():
        end_record = ends.get(exec_id)
        if end_record is not None:
            end, outcome = float(end_record["t"]), str(end_record["outcome"])
        elif deaths is not None and exec_id in deaths:
            end, outcome = deaths[exec_id], "died"
        else:
            end, outcome = math.inf, "open"
        executions.append(
            Execution(
                exec_id=exec_id,
                run_id=start["run_id"],
                step_key=start["step_key"],
                attempt=int(start["attempt"]),
                pid=int(start["pid"]),
                ppid=int(start["ppid"]),
                host=str(start.get("host", "?")),
                worker=start.get("worker"),
                proc_start=start.get("proc_start"),
                start=float(start["t"]),
                end=end,
                outcome=outcome,
            )
        )
    return sorted(executions, key=lambda e: e.start)


class DeathWatch:
    """Polls the processes of open executions and notes when each is first seen dead.

    Use as a context manager around everything that may kill a step's process; pass
    :attr:`deaths` to :func:`read_executions` (or call :meth:`executions`).
    """

    def __init__(self, path: str | os.PathLike[str], interval: float = 0.05) -> None:
        self.path = Path(path)
        self.interval = interval
        self.deaths: dict[str, float] = {}
        self._open: dict[str, tuple[int, int | None]] = {}
        self._offset = 0
        self._partial = b""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ledger-death-watch", daemon=True)

    def __enter__(self) -> "DeathWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop polling (after one last pass)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(5)

    def poll(self) -> None:
        """One pass: read new ledger lines, then check the processes of open executions."""
        with self._lock:
            self._read_new()
            now = time.time()
            for exec_id, (pid, proc_start) in list(self._open.items()):
                if not pid_alive(pid, proc_start):
                    self.deaths.setdefault(exec_id, now)
                    del self._open[exec_id]

    def executions(self) -> list[Execution]:
        """The ledger's executions as of now, ends filled in from observed deaths."""
        self.poll()
        with self._lock:
            deaths = dict(self.deaths)
        return read_executions(self.path, deaths)

    def _read_new(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("ev") == "start":
                self._open[record["exec"]] = (int(record["pid"]), record.get("proc_start"))
            else:
                self._open.pop(record["exec"], None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a torn read: try again on the next pass
                pass
            self._stop.wait(self.interval)
        with contextlib.suppress(Exception):
            self.poll()
