"""A JSON stats snapshot written atomically, for the long-running services' `--stats-file`.

Why a module: the answering machine and the delivery worker both expose their counters this
way, and a reader (a monitoring agent, the benchmarks) must never see a half-written file:
write to a sibling temporary file, then rename over the old one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_stats_file(path: Path | None, snapshot: dict[str, Any]) -> None:
    """Replace `path` with `snapshot` as JSON (nothing when `path` is None); an OSError is
    logged, not raised (the service goes on)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("stats not written to %s: %s", path, exc)
