"""Shared by the side-by-side store benchmarks (`cluster_store.py`, `numberdb.py`): process CPU
from /proc, and the table of per-INVITE costs with best and median rounds and their ratio."""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
COLUMNS = ("client CPU us", "wall us", "redis CPU us")


def proc_cpu(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def print_table(label: str, results: Mapping[str, Sequence[tuple[float, float, float]]],
                ratio: tuple[str, str], digits: int = 2) -> list[float]:
    """One row per side (best round, median round) of (client CPU, wall, Redis CPU) per
    INVITE, then the medians' ratio ``ratio[0] / ratio[1]``; returns that ratio."""
    print(f"{label:8} " + " ".join(f"{c:>22}" for c in COLUMNS))
    medians: dict[str, list[float]] = {}
    for name, rows in results.items():
        cols = []
        for i in range(len(COLUMNS)):
            vals = [r[i] for r in rows]
            cols.append(f"{min(vals):9.1f} (med {statistics.median(vals):7.1f})")
        medians[name] = [statistics.median(r[i] for r in rows) for i in range(len(COLUMNS))]
        print(f"{name:8} " + " ".join(f"{c:>22}" for c in cols))
    top, bottom = ratio
    # a run too short for /proc's CPU ticks measures 0: no ratio rather than a traceback
    ratios = [a / b if b else float("nan")
              for a, b in zip(medians[top], medians[bottom], strict=True)]
    print(f"{top} / {bottom} (medians): client CPU {ratios[0]:.{digits}f}, "
          f"wall {ratios[1]:.{digits}f}, redis CPU {ratios[2]:.{digits}f}")
    return ratios
