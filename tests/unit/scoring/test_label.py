"""scoring.label: which relayed calls go on with a spam label, and which labels are forged."""

from __future__ import annotations

import pytest

from scoring import label
from scoring.config import PARAMS, Config
from scoring.model import Action, Decision


def cfg(**values: object) -> Config:
    defaults = {k: p.default for k, p in PARAMS.items()}
    return Config({**defaults, **{k.replace("__", "."): v for k, v in values.items()}})


def validate(key: str, text: str) -> object:
    return PARAMS[key].parse(text)


def relay(score: float, rule: str = "score", **kw: object) -> Decision:
    return Decision(Action.RELAY, score, rule=rule, **kw)  # type: ignore[arg-type]


def test_off_by_default() -> None:
    assert label.header(relay(0.29), Config.defaults()) is None


def test_relayed_calls_at_or_above_the_threshold_are_labelled() -> None:
    c = cfg(label__threshold=0.2, label__info_url="https://op.example/spam")
    assert label.header(relay(0.19), c) is None
    assert label.header(relay(0.2), c) == \
        "<https://op.example/spam>;purpose=info;type=spam;confidence=20"
    assert label.header(relay(0.287), c) == \
        "<https://op.example/spam>;purpose=info;type=spam;confidence=29"
    c = cfg(label__threshold=0.2, label__info_url="https://op.example/spam",
            label__params="purpose=info;type=robocall;source=carrier.example")
    assert label.header(relay(0.5), c) == ("<https://op.example/spam>;purpose=info;"
                                           "type=robocall;source=carrier.example;confidence=50")


@pytest.mark.parametrize("decision", [
    Decision(Action.DIVERT, 0.5), Decision(Action.REJECT, 0.9),
    relay(0.5, rule="allowlist"), relay(0.5, rule="emergency"), relay(0.5, rule="disabled"),
    relay(0.5, rule="pass_token"),
])
def test_only_scored_relays_are_labelled(decision: Decision) -> None:
    assert label.header(decision, cfg(label__threshold=0.0)) is None


def test_monitor_mode_changes_no_call() -> None:
    assert label.header(relay(0.5), cfg(label__threshold=0.1, mode="monitor")) is None
    waived = relay(0.5, would=Action.DIVERT, waived="monitor")
    assert label.header(waived, cfg(label__threshold=0.1, mode="monitor")) is None


def test_an_opted_out_callee_still_gets_the_label() -> None:
    """Opt-out spares the call from diversion or rejection, not from the information."""
    opted = relay(0.8, would=Action.REJECT, waived="optout: number +15551230001")
    assert label.header(opted, cfg(label__threshold=0.2)) == \
        "<data:,>;purpose=info;type=spam;confidence=80"
    assert label.header(relay(1.0), cfg()) is None  # 1.0 labels nothing, even a 1.0 score


@pytest.mark.parametrize(("value", "is_forged"), [
    ("<https://x.example/>;purpose=info;type=spam;confidence=90", True),
    ("<https://x.example/> ; purpose = info ; type=not-spam", True),
    ("<https://x.example/>;purpose=INFO;Confidence=0", True),
    ("<https://x.example/photo.jpg>;purpose=icon", False),
    ("<https://x.example/>;purpose=info", False),
    ("<https://x.example/>;purpose=jwscard", False),
    ("<sip:127.0.0.1>;answer-after=0", False),
    ("", False),
])
def test_forged_labels(value: str, is_forged: bool) -> None:
    assert label.forged(value) is is_forged


@pytest.mark.parametrize(("key", "value", "message"), [
    ("label.threshold", "1.5", "above the maximum"),
    ("label.info_url", "ftp://x", "URL without spaces"),
    ("label.info_url", "https://a b", "URL without spaces"),
    ("label.info_url", "", "URL without spaces"),
    ("label.params", "type=spam", "purpose"),
    ("label.params", "purpose=info;type=spam\r\nX-Evil: 1", "header parameters"),
    ("label.params", "purpose=info;confidence=5", "confidence is added"),
    ("label.params", "purpose=info;x=\"quoted\"", "header parameters"),
])
def test_bad_settings_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(key, value)


def test_good_settings() -> None:
    assert validate("label.info_url", "data:,") == "data:,"
    assert validate("label.params", ";purpose=info;type=fraud;") == "purpose=info;type=fraud"
    assert validate("label.threshold", "0.25") == 0.25
