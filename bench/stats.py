"""Small statistics, table formatting and the machine description shared by the benchmarks."""

from __future__ import annotations

import datetime
import math
import os
import platform
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def use_python_framing() -> Any:
    """Switch this process to the record path's Python framing instead of the compiled one
    (sealmq/_speedups.c): what an install without a C compiler runs. Returns what was in use."""
    from sealmq import record

    saved = record.speedups
    record.speedups = None
    return saved


# The rows the comparisons share (bench.broker, bench.bench_media): the plaintext path run a second
# time in each round, whose ratio to the first is the table's own noise, and the sealed path's
# floor, each payload or chunk sealed by A128GCM (suite 6's AEAD) under one key and nothing else.
CONTROL = "plaintext again (control)"
FLOOR = "AEAD only"


def floor_aead(key_hex: str) -> Any:
    """The floor's cipher, the same on both sides of a run: A128GCM under the run's key."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(bytes.fromhex(key_hex))


def balanced_order(items: Sequence[T], k: int) -> list[T]:
    """The order of ``items`` in round ``k``: a Williams design, so that over a cycle of rounds (n
    for an even number n of items, 2n for an odd one) each item runs once in each position and
    right after each other item equally often. A plain rotation keeps each item's predecessor the
    same in every round, so whatever one run leaves behind (dirty pages, a warm cache) would always
    fall on the same next path."""
    n = len(items)
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [items[x] for x in rows[k % len(rows)]]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nearest-rank because the samples are few."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median_interval(values: Sequence[float], level: float = 0.90) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of ``values`` (independent rounds):
    the k-th smallest and k-th largest sample, with the largest k for which the binomial coverage
    1 - 2 P(Bin(n, 1/2) < k) is still at least ``level``. Exact for any continuous distribution,
    no resampling; None when there are too few samples (fewer than 5 at 90 %)."""
    ordered = sorted(values)
    n = len(ordered)
    best = 0
    below = 0.0  # P(Bin(n, 1/2) <= k - 1)
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1) / 2**n
        if 1 - 2 * below >= level:
            best = k
        else:
            break
    if best == 0:
        return None
    return ordered[best - 1], ordered[n - best]


# What the bracket after a median ratio means, for the tables' descriptions.
RATIO_INTERVAL = ("In brackets after a median ratio: its 90 % confidence interval (the order statistics of "
                  "the rounds' ratios, distribution-free: `bench.stats.median_interval`; shown from 5 rounds "
                  "on), the range that holds this host's true median ratio in 9 runs of the table out of 10.")


def ratio_cell(ratios: Sequence[float]) -> str:
    """A table cell for paired ratios: the median, then its 90 % interval (median_interval) in
    brackets when there are rounds enough, e.g. "0.92x [0.88-0.96]"; "-" when there are none."""
    if not ratios:
        return "-"
    interval = median_interval(ratios)
    bracket = f" [{interval[0]:.2f}-{interval[1]:.2f}]" if interval is not None else ""
    return f"{median(ratios):.2f}x{bracket}"


def median_cell(values: Sequence[float], digits: int = 2) -> str:
    """The median of ``values`` and, from 5 of them on, its 90 % interval in brackets (median_interval)."""
    interval = median_interval(values)
    bracket = f" [{fmt(interval[0], digits)}-{fmt(interval[1], digits)}]" if interval is not None else ""
    return f"{fmt(median(values), digits)}{bracket}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |"]
    aligns = []
    for i in range(len(headers)):
        numeric = all(_is_number(r[i]) for r in cells) and bool(cells)
        aligns.append("---:" if numeric else "---")
    lines.append("|" + "|".join(aligns) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x%"))
    except ValueError:
        return False
    return True


def fmt(value: float, digits: int = 1) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _mosquitto_version() -> str:
    try:
        out = subprocess.run(["mosquitto", "-h"], check=False, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    for line in (out.stdout + out.stderr).splitlines():
        if "version" in line:
            return line.strip()
    return "unknown"


def _cryptography_openssl() -> str:
    from cryptography.hazmat.backends.openssl import backend

    return str(backend.openssl_version_text())


def machine() -> str:
    """The machine description every recorded result carries."""
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    rows = [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("nproc", str(os.cpu_count())),
        ("CPU", _cpu_model()),
        ("load average at start (1/5/15 min)", load),
        ("OS", platform.platform()),
        ("Python", sys.version.split()[0]),
        ("OpenSSL (Python ssl)", ssl.OPENSSL_VERSION),
        ("OpenSSL (cryptography)", _cryptography_openssl()),
        ("cryptography", _version("cryptography")),
        ("cbor2", _version("cbor2")),
        ("paho-mqtt", _version("paho-mqtt")),
        ("amqtt", _version("amqtt")),
        ("mosquitto", _mosquitto_version()),
    ]
    return table(["what", "value"], rows)


def proc_stat(stat: Path) -> tuple[int, float]:
    """(parent pid, CPU seconds used so far: user + system) from a ``/proc/<pid>/stat`` file;
    OSError if the process is gone."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds process ``pid`` used so far; OSError if it is gone."""
    return proc_stat(Path(f"/proc/{pid}/stat"))[1]


def collect(results: Any, want: int, timeout: float) -> list[tuple[Any, ...]]:
    """``want`` items from a multiprocessing queue, all within ``timeout`` seconds (queue.Empty if not)."""
    out: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while len(out) < want:
        out.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
    return out
