"""CPU time from Linux /proc, as the benchmarks report it: the kernel's own accounting of a
process (or one of its threads), garbage collection and native threads included."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu_seconds(path: str | Path) -> float:
    """User + system CPU seconds in a /proc stat file (a process's or a thread's)."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()  # the name may hold spaces and ")"
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (its threads included)."""
    return stat_cpu_seconds(f"/proc/{pid}/stat")
