"""Redis key names (a contract: see docs/DESIGN.md, "Redis").

Every key starts with `spitwall:`. Per-entity keys carry a hash tag naming the entity, e.g.
`spitwall:{ip:203.0.113.7}:inv:10:172800`, so that one entity's keys live on one Redis Cluster
node and one script may touch them all. Attacker-controlled strings (caller URIs, callees) never
go into a key verbatim: long or unusual values are replaced by a digest, so a 10 KB From header
or non-UTF-8 bytes cannot make keys long or odd.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import zlib

PREFIX = "spitwall"

_SAFE = re.compile(r"^[A-Za-z0-9.+_@:/\-\[\]]{1,64}$")
#: IPv6 sources are counted per network of this many bits unless the config says otherwise
DEFAULT_V6_PREFIX = 64

# Operator state: one tag so the config, the lists and their versions change atomically.
CONFIG = f"{PREFIX}:{{cfg}}:config"
CONFIG_VERSION = f"{PREFIX}:{{cfg}}:version"
LISTS_VERSION = f"{PREFIX}:{{cfg}}:lists_version"
AUDIT = f"{PREFIX}:{{cfg}}:audit"  # same tag as what it audits: one MULTI on a cluster
#: "1"/"0": the kill switch (`enabled`) mirrored by every config change, for readers that must
#: not read the config hash (it holds secrets such as `media.token_key`): the metrics role
KILL_SWITCH = f"{PREFIX}:{{cfg}}:enabled"
STATS = f"{PREFIX}:{{stats}}:counters"
X5U_MISSES = f"{PREFIX}:{{stir}}:x5u_misses"  # certificate URLs to fetch (bounded list)
X5U_MISSES_MAX = 1000

DECISION_SEQ = f"{PREFIX}:{{dec}}:seq"
DECISION_BUCKETS = 4
DECISION_BUCKET_SIZE = 50_000
DECISION_TTL = 30 * 86400


def list_key(name: str) -> str:
    """Hash of one list (allow, block, scanner): field `kind:value` -> msgpack entry."""
    return f"{PREFIX}:{{cfg}}:list:{name}"


#: lists of the number database (`lists.numberdb`): one key per number and list
NUMBER_LISTS = ("allow", "block", "dno")


def number_key(number: str, name: str) -> str:
    """`spitwall:{num:+15550100}:block`: a normalised number on one list of the number
    database."""
    return f"{PREFIX}:{{num:{entity_id(number)}}}:{name}"


def number_keys(number: str) -> list[str]:
    """The number's keys on every list of the number database, in `NUMBER_LISTS` order (one
    hash tag: one MGET, valid on a cluster)."""
    return [number_key(number, name) for name in NUMBER_LISTS]


#: sorted sets per list that index the number database (member: number, score: expiry)
NUMBER_INDEX_BUCKETS = 128


def number_index_key(number: str, name: str) -> str:
    """The index bucket of a number on one list: `spitwall:{numidx:block:17}`."""
    bucket = zlib.crc32(number.encode("utf-8", "surrogateescape")) % NUMBER_INDEX_BUCKETS
    return f"{PREFIX}:{{numidx:{name}:{bucket}}}"


def number_index_keys(name: str) -> list[str]:
    return [f"{PREFIX}:{{numidx:{name}:{b}}}" for b in range(NUMBER_INDEX_BUCKETS)]


def decision_buckets() -> list[str]:
    return [f"{PREFIX}:{{dec}}:b{i}" for i in range(DECISION_BUCKETS)]


def entity_id(value: str) -> str:
    """A bounded, key-safe name for an attacker-controlled identity."""
    if _SAFE.fullmatch(value):
        return value
    digest = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=12)
    return "h" + digest.hexdigest()


def tag(kind: str, value: str) -> str:
    return f"{PREFIX}:{{{kind}:{entity_id(value)}}}"


def rate_keys(base: str, windows: tuple[int, ...], now: float) -> list[str]:
    """Current and previous bucket keys of a sliding-window counter, per window."""
    keys: list[str] = []
    for w in windows:
        bucket = int(now // w)
        keys.append(f"{base}:inv:{w}:{bucket}")
        keys.append(f"{base}:inv:{w}:{bucket - 1}")
    return keys


def source_keys(base: str, window: int, now: float) -> list[str]:
    """HyperLogLogs of distinct callers/callees, recent callees list, scanner counter."""
    bucket = int(now // window)
    return [
        f"{base}:callers:{window}:{bucket}",
        f"{base}:callers:{window}:{bucket - 1}",
        f"{base}:callees:{window}:{bucket}",
        f"{base}:callees:{window}:{bucket - 1}",
        f"{base}:recent",
        f"{base}:scan",
    ]


def source_id(ip: str, v6_prefix: int = DEFAULT_V6_PREFIX) -> str:
    """The entity that per-source counters, scanner sightings and reputation belong to.

    An IPv4 address is itself. An IPv6 address stands for its network of `v6_prefix` bits
    (`2001:db8:7:1::/64`): one subscriber gets a /64 (or a /56, /48) and can send from any of
    its 2^64 addresses, so counting per address would let a campaign rotate its source out of
    every per-source check. IPv4-mapped addresses (`::ffff:192.0.2.1`) are their IPv4 address.
    Anything that is not an address is returned unchanged (`entity_id` bounds it)."""
    if ":" not in ip:
        return ip  # IPv4 (or not an address): no parsing on the common path
    try:
        addr = ipaddress.IPv6Address(ip.strip("[]"))
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    if v6_prefix >= 128:
        return str(addr)
    return str(ipaddress.IPv6Network((addr, v6_prefix), strict=False))


def source_tag(ip: str, v6_prefix: int = DEFAULT_V6_PREFIX) -> str:
    """Hash-tagged key base of a source (see `source_id`)."""
    return tag("ip", source_id(ip, v6_prefix))


def scan_key(ip: str, v6_prefix: int = DEFAULT_V6_PREFIX) -> str:
    return f"{source_tag(ip, v6_prefix)}:scan"
