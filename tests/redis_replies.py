"""Typed views of redis-py replies and arguments, for the tests and the benchmarks.

redis-py types a reply for both client modes at once (``bytes | str`` keys and values, and
``| None`` for stream reads), while a test knows which client it holds: ``decode_responses``
or not. These helpers give a reply the type of that mode. They check the container's type
(an AssertionError otherwise) and return the reply itself, so a test asserts what it did.

XADD's and HSET's field mappings are typed ``dict[FieldT, EncodableT]`` (invariant keys), so a
``dict[str, str]`` or a ``dict[bytes, bytes]`` read back from Redis does not fit as it is:
`as_fields` gives the same pairs in that type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from redis.typing import EncodableT, FieldT

K = TypeVar("K", bytes, str)

BytesEntry = tuple[bytes, dict[bytes, bytes]]
StrEntry = tuple[str, dict[str, str]]


def bytes_entries(reply: object) -> list[BytesEntry]:
    """An XRANGE / XREVRANGE reply of a client without ``decode_responses``."""
    assert isinstance(reply, list), reply
    return reply


def str_entries(reply: object) -> list[StrEntry]:
    """An XRANGE / XREVRANGE reply of a ``decode_responses=True`` client."""
    assert isinstance(reply, list), reply
    return reply


def bytes_hash(reply: object) -> dict[bytes, bytes]:
    """An HGETALL reply of a client without ``decode_responses``."""
    assert isinstance(reply, dict), reply
    return reply


def str_hash(reply: object) -> dict[str, str]:
    """An HGETALL reply of a ``decode_responses=True`` client."""
    assert isinstance(reply, dict), reply
    return reply


def as_fields(mapping: Mapping[K, EncodableT]) -> dict[FieldT, EncodableT]:
    """The same field/value pairs, in the type XADD and HSET take."""
    return dict(mapping.items())
