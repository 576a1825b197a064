"""Worker memory and CPU: a sampling thread over each worker's whole process tree.

A worker's footprint is its own process plus its children (the forked step processes of a
taskiq worker, the prefork pool of a celery worker). RSS summed over a tree counts pages shared
after ``fork`` once per process, so PSS (each shared page divided among its sharers) is reported
next to it; PSS is the fairer "memory this worker costs" figure.
"""

import dataclasses
import threading

import psutil

MIB = 2**20


@dataclasses.dataclass
class TreeMemory:
    """Peaks of one worker's process tree."""

    worker: str
    executor: str
    ready_rss_mib: float = 0.0
    idle_rss_mib: float = 0.0
    idle_tree_rss_mib: float = 0.0
    idle_tree_pss_mib: float = 0.0
    busy_rss_mib: float = 0.0
    busy_tree_rss_mib: float = 0.0
    busy_tree_pss_mib: float = 0.0
    max_processes: int = 0
    samples: int = 0


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_memory(pid: int, with_pss: bool = True) -> tuple[float, float, float, int]:
    """(root RSS, tree RSS, tree PSS, process count) in MiB; PSS is 0 without ``with_pss``."""
    root_rss = tree_rss = tree_pss = 0.0
    procs = _tree(pid)
    for index, proc in enumerate(procs):
        try:
            if with_pss:
                info = proc.memory_full_info()
                rss, pss = info.rss, getattr(info, "pss", 0)
            else:
                rss, pss = proc.memory_info().rss, 0
        except psutil.Error:
            continue
        if index == 0:
            root_rss = rss / MIB
        tree_rss += rss / MIB
        tree_pss += pss / MIB
    return root_rss, tree_rss, tree_pss, len(procs)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, its reaped children and its live descendants."""
    total = 0.0
    procs = _tree(pid)
    for index, proc in enumerate(procs):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
        if index == 0:
            total += times.children_user + times.children_system
    return total


class Sampler(threading.Thread):
    """Samples every worker's tree; attributes samples to *idle* or *busy* phases.

    ``busy`` names the executor whose run is in progress (None between runs); a worker is busy
    while its own executor runs. Idle figures are taken only for executors in ``warm`` (those
    that have finished a run, so their workers have imported the job code): they show the
    steady idle state, not the cold start.
    """

    def __init__(self, workers: dict[str, tuple[int, str]], interval: float = 0.2) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.interval = interval
        self.pids = {name: pid for name, (pid, _) in workers.items()}
        self.stats = {
            name: TreeMemory(worker=name, executor=executor)
            for name, (_, executor) in workers.items()
        }
        self.busy: str | None = None
        self.warm: set[str] = set()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        for name, pid in self.pids.items():
            root, _, _, _ = tree_memory(pid, with_pss=False)
            self.stats[name].ready_rss_mib = root

    def run(self) -> None:
        """Sample until stopped."""
        while not self._halt.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Take one sample of every worker."""
        busy, warm = self.busy, set(self.warm)
        for name, pid in self.pids.items():
            stats = self.stats[name]
            is_busy = busy is not None and busy == stats.executor
            if not is_busy and stats.executor not in warm:
                continue
            root, rss, pss, count = tree_memory(pid)
            with self._lock:
                stats.samples += 1
                stats.max_processes = max(stats.max_processes, count)
                if is_busy:
                    stats.busy_rss_mib = max(stats.busy_rss_mib, root)
                    stats.busy_tree_rss_mib = max(stats.busy_tree_rss_mib, rss)
                    stats.busy_tree_pss_mib = max(stats.busy_tree_pss_mib, pss)
                else:
                    stats.idle_rss_mib = max(stats.idle_rss_mib, root)
                    stats.idle_tree_rss_mib = max(stats.idle_tree_rss_mib, rss)
                    stats.idle_tree_pss_mib = max(stats.idle_tree_pss_mib, pss)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._halt.set()
        if self.is_alive():
            self.join(5)

    def snapshot(self) -> list[TreeMemory]:
        """Copies of the current per-worker figures."""
        with self._lock:
            return [dataclasses.replace(s) for s in self.stats.values()]
