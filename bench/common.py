"""Shared helpers for the benchmarks: timing, memory sampling, result files."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    from threadpoolctl import threadpool_info

    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "blas": [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]}


def timeit(fn: Callable[[], Any], reps: int = 3, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median seconds per call over ``reps`` timed calls (after ``warmup``)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds so that drift
    in the machine's load falls on all of them alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> "PeakMemory":
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def previous_results(name: str) -> dict[str, Any]:
    """bench/results/<name>.json without its header, so that one part can be re-run and
    the others kept."""
    from qshift.io import read_json

    path = RESULTS / f"{name}.json"
    data = read_json(path) if path.is_file() else {}
    for k in ("benchmark", "date", "machine"):
        data.pop(k, None)
    return data


def write_results(name: str, data: dict[str, Any], markdown: str) -> None:
    """bench/results/<name>.json and .md, written atomically."""
    from qshift.io import write_json, write_text

    data = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **data}
    write_json(RESULTS / f"{name}.json", data)
    write_text(RESULTS / f"{name}.md", markdown.rstrip() + "\n")


def md_table(rows: list[dict[str, Any]], cols: list[str], fmt: dict[str, str] | None = None) -> str:
    fmt = fmt or {}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(format(v, fmt[c]) if c in fmt and isinstance(v, (int, float)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
