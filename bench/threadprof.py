"""CPU profile of every thread of a process, for the benchmarks (``cProfile`` per thread, merged).

``cProfile`` follows only the thread that enabled it, and the processes the broker benchmark
profiles (the backend service, the device simulator) do their work on paho's network threads
and the agents' timer threads. :class:`ThreadProfiler` gives each thread started after
:meth:`~ThreadProfiler.install` its own ``cProfile.Profile`` (through ``threading.setprofile``),
timed by that thread's CPU clock (``time.thread_time_ns``), so a thread blocked in ``select`` or
waiting for the GIL costs nothing. :meth:`~ThreadProfiler.mark` snapshots the totals so far, and
:meth:`~ThreadProfiler.report` prints what was spent after the mark: threads that were already
running (the backend's) count only from there. Profiling slows Python code down several times:
the figures say where the CPU goes, never how fast a run is.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import threading
import time
from pathlib import Path
from typing import Any

from bench.stats import table

# pstats' key: (file, line, function); value: (primitive calls, calls, tottime, cumtime, callers)
Totals = dict[tuple[str, int, str], tuple[int, float, float]]


class ThreadProfiler:
    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._by_thread: dict[int, cProfile.Profile] = {}
        self._lock = threading.Lock()
        self._base: Totals = {}

    def install(self, *, here: bool = True) -> None:
        """Profile every thread started from now on, and (``here``) the calling thread."""
        threading.setprofile(self._start_in_thread)
        if here:
            self._start_here()

    def _start_in_thread(self, frame: Any, event: str, arg: Any) -> None:
        # the first profile event in a new thread: replace this hook with the C profiler
        self._start_here()

    def _start_here(self) -> None:
        prof = cProfile.Profile(time.thread_time_ns, 1e-9)
        with self._lock:
            self._profiles.append(prof)
            self._by_thread[threading.get_ident()] = prof
        prof.enable()

    def _totals(self) -> Totals:
        out: Totals = {}
        with self._lock:
            profiles = list(self._profiles)
        for prof in profiles:
            prof.snapshot_stats()  # reads the entries; does not disable another thread's profiler
            stats: Any = prof.stats
            for func, (_cc, nc, tt, ct, _callers) in stats.items():
                n0, t0, c0 = out.get(func, (0, 0.0, 0.0))
                out[func] = (n0 + nc, t0 + tt, c0 + ct)
        return out

    def mark(self) -> None:
        """From now on: what :meth:`report` shows is spent after this call."""
        own = self._by_thread.get(threading.get_ident())
        if own is not None:
            own.disable()  # the snapshot itself is not part of the profile
        self._base = self._totals()
        if own is not None:
            own.enable()

    def report(self, top: int = 15) -> tuple[float, str]:
        """(CPU seconds profiled since the mark, a markdown table of the ``top`` functions by own time)."""
        own = self._by_thread.get(threading.get_ident())
        if own is not None:
            own.disable()  # the calling thread's profile ends here
        rows: list[tuple[str, int, float, float]] = []
        for func, (nc, tt, ct) in self._totals().items():
            n0, t0, c0 = self._base.get(func, (0, 0.0, 0.0))
            if nc - n0 > 0 or tt - t0 > 0:
                rows.append((_name(func), nc - n0, tt - t0, ct - c0))
        self._dump()
        total = sum(r[2] for r in rows)
        rows.sort(key=lambda r: r[2], reverse=True)
        shown = [[name, f"{n:,}", f"{tt * 1e3:,.1f}", f"{100 * tt / total:.1f}" if total else "-",
                  f"{ct * 1e3:,.1f}"] for name, n, tt, ct in rows[:top]]
        return total, table(["function", "calls", "own CPU (ms)", "% of profiled", "with callees (ms)"], shown)


    def _dump(self) -> None:
        """With SEALMQ_BENCH_PSTATS=DIR, also write the merged profile (callers included, counted
        from the start, not from the mark) to DIR/<pid>.pstats for ``python3 -m pstats``."""
        where = os.environ.get("SEALMQ_BENCH_PSTATS")
        if not where:
            return
        merged = pstats.Stats()
        with self._lock:
            for prof in self._profiles:
                prof.snapshot_stats()
                snapshot: Any = _Snapshot(prof.stats)
                merged.add(snapshot)
        Path(where).mkdir(parents=True, exist_ok=True)
        merged.dump_stats(str(Path(where) / f"{os.getpid()}.pstats"))


class _Snapshot:
    """What ``pstats.Stats.add`` takes: an object with ``create_stats()`` and ``stats``."""

    def __init__(self, stats: Any) -> None:
        self.stats = dict(stats)

    def create_stats(self) -> None:
        pass


def _name(func: tuple[str, int, str]) -> str:
    path, line, name = func
    if path == "~":  # a built-in: cProfile names it "<built-in method ...>" or "<method ... objects>"
        return name.replace("|", "/")
    for marker in ("site-packages/", "/lib/python3", "/wt-", "/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            path = path.split("/", 1)[1] if marker in ("/wt-", "/lib/python3") else path
            break
    return f"{path}:{line}({name})".replace("|", "/")
