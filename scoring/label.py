"""Labelling: relay a suspicious call, and tell the callee's phone what we think of it.

Between relaying silently and diverting there is what carriers mostly do with doubtful calls:
put them through with a label ("spam likely") that the terminating side shows or acts on. The
label is a `Call-Info` header field as draft-ietf-sipcore-callinfo-spam describes it (an
expired IETF draft, the only standard proposal for it): ``purpose=info`` with the call's type
and our confidence in percent, e.g.
``Call-Info: <https://operator.example/spam>;purpose=info;type=spam;confidence=42``.
Terminating equipment that expects other parameters gets them with `label.params`.

A relayed call is labelled when its score reaches `label.threshold` (1.0, the default, labels
nothing: a relayed call always scores below the divert threshold). Calls relayed without
scoring (allow list, emergency, kill switch) are never labelled. A label is only worth
something if the caller cannot forge it, so labels that arrive from untrusted sources are
removed (`forged`), as the ring-control headers are (`scoring.checks.ring_hijack`).
"""

from __future__ import annotations

import re

from scoring.config import Config
from scoring.model import Action, Decision

#: decision rules of relayed calls that were scored (the others were relayed unscored)
SCORED_RULES = frozenset({"score"})
_PARAM = re.compile(r";\s*(type|confidence|spam|call-type)\s*=", re.IGNORECASE)


def header(decision: Decision, config: Config) -> str | None:
    """The `Call-Info` value to add to this relayed call, or None (not labelled)."""
    if decision.action is not Action.RELAY or decision.rule not in SCORED_RULES \
            or config["mode"] == "monitor":
        return None  # monitor mode changes no call
    threshold = config.get_float("label.threshold")
    if threshold >= 1.0 or decision.score < threshold:
        return None
    confidence = max(0, min(100, round(decision.score * 100)))
    params = str(config["label.params"]).strip().strip(";")
    return f"<{config['label.info_url']}>;{params};confidence={confidence}"


def forged(call_info: str) -> bool:
    """Whether a caller's Call-Info carries a label (purpose=info with a type or confidence
    parameter): from an untrusted source it is removed before the call goes on."""
    low = call_info.lower()
    return "purpose=info" in low.replace(" ", "") and _PARAM.search(low) is not None
