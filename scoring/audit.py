"""Append-only audit trail of operator changes (config, lists): who, when, what, old, new.

Entries go to the Redis stream `spitwall:{cfg}:audit` inside the same MULTI as the change, so a
change is never applied without its audit record. The stream is capped (approximate MAXLEN) so it
stays bounded; export it if you must keep more.
"""

from __future__ import annotations

import getpass
import os
import time
from typing import Any

from scoring import keys

AUDIT_MAXLEN = 100_000


def os_user() -> str:
    """The OS user making the change; `sudo` users are named as `user (via sudo)`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.geteuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (via sudo as {user})" if sudo and sudo != user else user


def append(pipe: Any, *, what: str, action: str, key: str, old: str, new: str,
           user: str | None = None) -> None:
    """Queue an audit record on a redis-py pipeline (inside the change's transaction)."""
    pipe.xadd(
        keys.AUDIT,
        {"ts": f"{time.time():.3f}", "user": user or os_user(), "what": what,
         "action": action, "key": key, "old": old, "new": new},
        maxlen=AUDIT_MAXLEN,
        approximate=True,
    )
