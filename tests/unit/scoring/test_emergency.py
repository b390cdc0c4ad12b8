"""scoring.emergency: which Request-URIs are emergency calls (the service's handling of them:
tests/unit/scoring/test_service.py)."""

from __future__ import annotations

import pytest

from scoring.emergency import parse_numbers, service

CODES = frozenset({"112", "911"})


@pytest.mark.parametrize("ruri, user, expected", [
    ("urn:service:sos", "", "urn:service:sos"),
    ("URN:Service:SOS.police", "", "urn:service:sos.police"),
    ("urn:service:sos;foo=bar", "", "urn:service:sos"),
    ("sip:911@carrier.example;user=phone", "911", "911"),
    ("tel:+112", "+112", "112"),
    ("sip:sos@ims.example", "sos", "sos"),
    ("urn:service:sosx", "", None),  # not a sos service
    ("urn:service:counseling", "", None),
    ("sip:9110@carrier.example", "9110", None),
    ("sip:19115550100@carrier.example", "19115550100", None),
    ("sip:bob@carrier.example", "bob", None),
    ("", "", None),
])
def test_service_recognises_emergency_request_uris(ruri: str, user: str,
                                                   expected: str | None) -> None:
    assert service(ruri, user, CODES) == expected


def test_parse_numbers() -> None:
    assert parse_numbers("112, 911,+999,,") == {"112", "911", "999"}
    for bad in ("91a", "1", "1234567", "911;drop"):
        with pytest.raises(ValueError, match="is not 2 to 6 digits"):
            parse_numbers(bad)
