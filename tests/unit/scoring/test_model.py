"""Small pure helpers of scoring.model."""

from __future__ import annotations

import pytest

from scoring.model import caller_identity, pack_dialog_note, unpack_dialog_note


@pytest.mark.parametrize("diverted,ip,caller", [
    (False, "127.0.2.1", "tel:15550100001"),
    (True, "::1", "alice@example.com"),
    (False, "10.0.0.1", "we|ird|user@example.com"),  # '|' in the caller survives
    (False, "10.0.0.1", ""),
])
def test_dialog_note_round_trip(diverted: bool, ip: str, caller: str) -> None:
    assert unpack_dialog_note(pack_dialog_note(diverted, ip, caller)) == (diverted, ip, caller)


@pytest.mark.parametrize("text", ["", "0", "0|1.2.3.4", "x|1.2.3.4|c", "|||"])
def test_malformed_dialog_note_means_no_feedback(text: str) -> None:
    assert unpack_dialog_note(text) == (True, "", "")


def test_dialog_note_bounds_the_caller() -> None:
    assert len(unpack_dialog_note(pack_dialog_note(False, "1.2.3.4", "a" * 1000))[2]) == 256


def test_caller_identity_numbers_and_uris() -> None:
    assert caller_identity("+15550100001", "x.example") == caller_identity("15550100001") \
        == "tel:15550100001"
    assert caller_identity("Alice", "Example.COM") == "alice@example.com"
