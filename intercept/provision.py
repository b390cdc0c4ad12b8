"""Provisioning of intercept/recording targets and SUBSCRIBE recorders, always audited.

Why a module of its own: provisioning is the one place where the intercept state changes, and
CALEA-style deployments must be able to show who changed what, when. So every change is one
MULTI/EXEC that changes the hash, bumps `names.VERSION` (targets only: the proxy reloads when it
changes) and appends to the audit stream `names.AUDIT`; a change without its audit record cannot
happen. The audit stream is never trimmed here, and the Redis roles (`intercept.acl`) give no one
but the ``default`` user DEL/XTRIM/XDEL/XSETID on it; `audit_integrity` reports entries removed
anyway (an XADD with MAXLEN is the one trim Redis ACLs cannot forbid).

The functions take a redis-py client (the ``spitwall-li-admin`` user in production), raise
`ValueError` for bad input (nothing is changed then) and `LookupError` for unknown LIIDs or
recorder addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from intercept import names
from intercept.delivery import digest
from intercept.targets import (
    DELIVERABLES,
    SIDES,
    Target,
    check_certificate,
    check_liid,
    normalise_identity,
    unpack_record,
    unpack_targets,
)
from scoring.audit import os_user

#: digest realm of recorder credentials: HA1 = H(user ":" REALM ":" password)
REALM = digest.REALM
RECORDER_VERSION = 1
MAX_IDENTITIES = 100
WATCH_RETRIES = 20
_DIGEST_USER = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=\-]{1,64}")


# -- targets ---------------------------------------------------------------------------------
def cert_summary(pem: bytes, now: float | None = None) -> dict[str, Any]:
    """Subject, issuer, SHA-256 fingerprint and validity of a certificate (never the PEM)."""
    cert = x509.load_pem_x509_certificate(pem)
    t = time.time() if now is None else now
    not_after = cert.not_valid_after_utc.timestamp()
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": not_after,
        "expired": not_after <= t,
    }


def build_target(
    *,
    liid: str,
    identities: Sequence[str],
    deliver_to: str,
    cert_pem: bytes,
    start: float | None = None,
    end: float | None = None,
    sides: Sequence[str] = SIDES,
    deliver: Sequence[str] = DELIVERABLES,
    mode: str = "intercept",
    user: str | None = None,
    now: float | None = None,
) -> Target:
    """A validated `Target` from operator input (`ValueError` with one line for bad input).

    Identities are normalised (duplicates dropped); the certificate must be an RSA X.509
    certificate that has not expired; the end, when given, must lie in the future."""
    t = time.time() if now is None else now
    check_liid(liid)
    if not identities:
        raise ValueError("a target needs at least one identity (--target)")
    if len(identities) > MAX_IDENTITIES:
        raise ValueError(f"at most {MAX_IDENTITIES} identities per LIID")
    normalised: list[str] = []
    for given in identities:
        ident = normalise_identity(given)
        if ident not in normalised:
            normalised.append(ident)
    cert = check_certificate(cert_pem)
    if cert.not_valid_after_utc.timestamp() <= t:
        raise ValueError(f"recipient certificate expired on "
                         f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
    begin = t if start is None else float(start)
    if end is not None and float(end) <= t:
        raise ValueError("end time is in the past")
    return Target(
        liid=liid, identities=tuple(normalised), deliver_to=deliver_to,
        cert_pem=bytes(cert_pem), start=begin, end=None if end is None else float(end),
        sides=tuple(dict.fromkeys(sides)), deliver=tuple(dict.fromkeys(deliver)), mode=mode,
        given=tuple(identities), created_at=t, created_by=user or os_user(),
    )


def target_summary(target: Target, now: float | None = None) -> dict[str, Any]:
    """A target as JSON-ready data: everything but the certificate body."""
    t = time.time() if now is None else now
    return {
        "liid": target.liid, "mode": target.mode, "identities": list(target.identities),
        "given": list(target.given), "match": list(target.sides),
        "deliver": list(target.deliver), "deliver_to": target.deliver_to,
        "start": target.start, "end": target.end, "active": target.active(t),
        "cert": cert_summary(target.cert_pem, t),
        "created_at": target.created_at, "created_by": target.created_by,
    }


def append_audit(pipe: Any, action: str, *, liid: str = "", address: str = "",
                 detail: Mapping[str, Any] | None = None, user: str | None = None) -> None:
    """Queue one audit entry (on a MULTI pipeline, with the change it records).

    Fields: ts, user, action, liid, address, detail (JSON). Never trimmed: no MAXLEN."""
    pipe.xadd(names.AUDIT, {
        "ts": f"{time.time():.3f}", "user": user or os_user(), "action": action,
        "liid": liid, "address": address,
        "detail": json.dumps(dict(detail or {}), sort_keys=True, default=str),
    })


def iso(ts: float | None) -> str | None:
    """Unix time -> ``2026-11-27T10:00:00Z`` (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _audit_detail(target: Target) -> dict[str, Any]:
    """What an audit entry records of a target: no certificate body, times readable."""
    summary = target_summary(target)
    cert = summary.pop("cert")
    summary["cert"] = {"subject": cert["subject"], "sha256": cert["sha256"],
                       "not_after": iso(cert["not_after"])}
    summary["start"], summary["end"] = iso(target.start), iso(target.end)
    for k in ("active", "created_at", "created_by"):
        summary.pop(k)
    return summary


def add_target(client: redis.Redis, target: Target, *, replace: bool = False,
               user: str | None = None) -> bool:
    """Store `target`; returns whether it replaced an existing LIID.

    An existing LIID is an error unless ``replace`` is given. Atomic with the version bump and
    the audit entry (WATCH: a concurrent change of the targets makes us re-check)."""
    if not isinstance(target, Target):
        raise TypeError("add_target needs a Target (see build_target)")
    for _ in range(WATCH_RETRIES):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(names.TARGETS)  # type: ignore[no-untyped-call]
                raw = pipe.hget(names.TARGETS, target.liid)
                old = _unpack_or_none(raw)
                if raw is not None and not replace:
                    raise ValueError(f"LIID {target.liid} already exists "
                                     "(remove it first, or replace it: --replace)")
                detail = _audit_detail(target)
                if old is not None:
                    detail["replaced"] = _audit_detail(old)
                elif raw is not None:
                    detail["replaced"] = "unreadable record"
                pipe.multi()
                pipe.hset(names.TARGETS, target.liid, target.pack())
                pipe.incr(names.VERSION)
                append_audit(pipe, "target.replace" if raw is not None else "target.add",
                             liid=target.liid, detail=detail, user=user)
                pipe.execute()
                return raw is not None
            except redis.WatchError:
                continue
    raise RuntimeError("targets kept changing; try again")


def _unpack_or_none(raw: Any) -> Target | None:
    if raw is None:
        return None
    try:
        return Target.unpack(bytes(raw))
    except ValueError:
        return None


def list_targets(client: redis.Redis) -> tuple[list[Target], list[str]]:
    """All targets sorted by LIID, and one error line per unreadable record."""
    raw: Any = client.hgetall(names.TARGETS)
    good, bad = unpack_targets(raw)
    return sorted(good, key=lambda t: t.liid), [f"LIID {_text(key)}: {exc}" for key, exc in bad]


def show_target(client: redis.Redis, liid: str) -> Target:
    """The target of ``liid`` (`LookupError` when there is none)."""
    check_liid(liid)
    raw: Any = client.hget(names.TARGETS, liid)
    if raw is None:
        raise LookupError(f"no target with LIID {liid}")
    return Target.unpack(raw)


def remove_target(client: redis.Redis, liid: str, *, user: str | None = None) -> Target | None:
    """Remove ``liid``; returns the removed record (None if it was unreadable).
    `LookupError` when there is no such LIID (nothing changed, nothing audited)."""
    check_liid(liid)
    for _ in range(WATCH_RETRIES):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(names.TARGETS)  # type: ignore[no-untyped-call]
                raw = pipe.hget(names.TARGETS, liid)
                if raw is None:
                    raise LookupError(f"no target with LIID {liid}")
                old = _unpack_or_none(raw)
                pipe.multi()
                pipe.hdel(names.TARGETS, liid)
                pipe.incr(names.VERSION)
                append_audit(pipe, "target.remove", liid=liid,
                             detail=_audit_detail(old) if old else {"record": "unreadable"},
                             user=user)
                pipe.execute()
                return old
            except redis.WatchError:
                continue
    raise RuntimeError("targets kept changing; try again")


# -- recorders -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recorder:
    """A source allowed to SUBSCRIBE (Event: srtp): an IP, IP:port or CIDR, optionally with
    digest credentials (only the HA1s = H(user:REALM:password) are kept: SHA-256, and MD5
    unless turned off) and optionally limited to some LIIDs. The delivery worker reads these
    records (`intercept.delivery.policy`)."""

    address: str  # normalised (`normalise_address`)
    user: str = ""
    ha1: str = ""  # MD5; '' = MD5 not accepted
    liids: tuple[str, ...] = ()  # empty: any LIID
    created_at: float = 0.0
    created_by: str = ""
    ha1_sha256: str = ""

    @property
    def algorithms(self) -> list[str]:
        """The digest algorithms this recorder may answer with, preferred first."""
        return [alg for alg, value in ((digest.SHA256, self.ha1_sha256), (digest.MD5, self.ha1))
                if value]

    def pack(self) -> bytes:
        record: dict[str, Any] = {
            "v": RECORDER_VERSION, "address": self.address, "user": self.user, "ha1": self.ha1,
            "liids": list(self.liids), "at": self.created_at, "by": self.created_by,
        }
        if self.ha1_sha256:
            record["ha1_sha256"] = self.ha1_sha256
        blob: bytes = msgpack.packb(record, use_bin_type=True)
        return blob

    @classmethod
    def unpack(cls, blob: bytes) -> Recorder:
        d = unpack_record(blob, RECORDER_VERSION, "recorder")
        try:
            return cls(address=str(d["address"]), user=str(d.get("user", "")),
                       ha1=str(d.get("ha1", "")), liids=tuple(d.get("liids") or ()),
                       created_at=float(d.get("at", 0.0)), created_by=str(d.get("by", "")),
                       ha1_sha256=str(d.get("ha1_sha256", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"recorder record incomplete: {exc!r}") from None

    def as_json(self) -> dict[str, Any]:
        """Without the HA1s (they are password-equivalent for digest)."""
        return {"address": self.address, "user": self.user or None,
                "credentials": bool(self.algorithms), "digest": self.algorithms,
                "liids": list(self.liids),
                "created_at": self.created_at, "created_by": self.created_by}


def normalise_address(text: str) -> str:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or ``CIDR`` -> canonical text; `ValueError`."""
    if not isinstance(text, str) or not text.strip() or len(text) > 64:
        raise ValueError(f"recorder address {text!r} must be an IP, IP:port or CIDR")
    t = text.strip()
    bad = ValueError(f"recorder address {t!r} is not an IP, IP:port, [IPv6]:port or CIDR")
    try:
        if "/" in t:
            return str(ipaddress.ip_network(t, strict=False))
        port_text = ""
        if t.startswith("["):
            host, _, rest = t[1:].partition("]")
            if not rest.startswith(":"):
                raise bad
            ip = ipaddress.ip_address(host)
            port_text = rest[1:]
        elif t.count(":") == 1:
            host, _, port_text = t.partition(":")
            ip = ipaddress.ip_address(host)
        else:
            return str(ipaddress.ip_address(t))
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise bad
        host_text = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{host_text}:{int(port_text)}"
    except ValueError:
        raise bad from None


def digest_ha1(user: str, password: str, realm: str = REALM, algorithm: str = digest.MD5) -> str:
    """HA1 of SIP digest: hex H(``user:realm:password``), H = MD5 (RFC 2617) or SHA-256
    (RFC 7616, RFC 8760); `ValueError` for a user or password we do not store."""
    if not _DIGEST_USER.fullmatch(user or ""):
        raise ValueError(f"recorder user {user!r} must be 1-64 characters of A-Z a-z 0-9 "
                         "._~!$&'()*+,;=-")
    if not password:
        raise ValueError("recorder password must not be empty")
    if len(password) > 1024 or any(ord(ch) < 32 for ch in password):
        raise ValueError("recorder password must be at most 1024 printable characters")
    return digest.ha1(user, password, realm, algorithm)


def recorder_allow(client: redis.Redis, addresses: Iterable[str], *, user: str = "",
                   password: str | None = None, liids: Sequence[str] = (),
                   who: str | None = None, md5: bool = True) -> list[Recorder]:
    """Allow these addresses to SUBSCRIBE (replacing their previous entry), with digest
    credentials when ``user`` is given (then ``password`` is required; SHA-256, and MD5 for
    older recorders unless ``md5`` is False), for the given LIIDs only when ``liids`` is not
    empty. All or nothing."""
    normalised = list(dict.fromkeys(normalise_address(a) for a in addresses))
    if not normalised:
        raise ValueError("give at least one recorder ADDRESS")
    cases = tuple(dict.fromkeys(check_liid(x) for x in liids))
    with_credentials = bool(user) or password is not None
    if not md5 and not with_credentials:
        raise ValueError("--no-md5 is about digest credentials: give --user")
    ha1 = digest_ha1(user, password or "") if with_credentials and md5 else ""
    ha1_sha256 = (digest_ha1(user, password or "", algorithm=digest.SHA256)
                  if with_credentials else "")
    now = time.time()
    by = who or os_user()
    records = [Recorder(a, user, ha1, cases, now, by, ha1_sha256) for a in normalised]
    existing: Any = client.hmget(names.RECORDERS, normalised)
    pipe = client.pipeline(transaction=True)
    for rec, old in zip(records, existing, strict=True):
        pipe.hset(names.RECORDERS, rec.address, rec.pack())
        append_audit(pipe, "recorder.allow", address=rec.address, user=by,
                     detail={"user": user or None, "credentials": with_credentials,
                             "digest": rec.algorithms,
                             "liids": list(cases), "replaced": old is not None})
    pipe.execute()
    return records


def recorder_list(client: redis.Redis) -> tuple[list[Recorder], list[str]]:
    raw: Any = client.hgetall(names.RECORDERS)
    good: list[Recorder] = []
    errors: list[str] = []
    for key, blob in raw.items():
        try:
            good.append(Recorder.unpack(blob))
        except ValueError as exc:
            errors.append(f"recorder {_text(key)}: {exc}")
    return sorted(good, key=lambda r: r.address), errors


def recorder_remove(client: redis.Redis, addresses: Iterable[str], *,
                    who: str | None = None) -> list[str]:
    """Remove these addresses; all must be allowed now (`LookupError`, nothing changed)."""
    normalised = list(dict.fromkeys(normalise_address(a) for a in addresses))
    if not normalised:
        raise ValueError("give at least one recorder ADDRESS")
    by = who or os_user()
    for _ in range(WATCH_RETRIES):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(names.RECORDERS)  # type: ignore[no-untyped-call]
                present: Any = pipe.hmget(names.RECORDERS, normalised)
                missing = [a for a, v in zip(normalised, present, strict=True) if v is None]
                if missing:
                    raise LookupError(f"not an allowed recorder: {', '.join(missing)}")
                pipe.multi()
                pipe.hdel(names.RECORDERS, *normalised)
                for a in normalised:
                    append_audit(pipe, "recorder.remove", address=a, user=by)
                pipe.execute()
                return normalised
            except redis.WatchError:
                continue
    raise RuntimeError("recorders kept changing; try again")


# -- audit -----------------------------------------------------------------------------------
def audit_tail(client: redis.Redis, count: int | None = 20) -> list[dict[str, Any]]:
    """The last ``count`` audit entries (all when None), oldest first, with ``id`` and the
    detail decoded."""
    if count is not None and count < 1:
        raise ValueError("count must be at least 1")
    entries: Any = client.xrevrange(names.AUDIT, count=count)
    rows: list[dict[str, Any]] = []
    for entry_id, fields in reversed(entries or []):
        row: dict[str, Any] = {"id": _text(entry_id)}
        row.update({_text(k): _text(v) for k, v in fields.items()})
        with contextlib.suppress(ValueError):
            row["detail"] = json.loads(row.get("detail") or "{}")
        rows.append(row)
    return rows


def audit_integrity(client: redis.Redis) -> dict[str, int]:
    """Length of the audit stream, entries ever added, and how many were removed (should be 0:
    anything else means someone trimmed or deleted audit entries)."""
    try:
        info: Any = client.xinfo_stream(names.AUDIT)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return {"length": 0, "entries_added": 0, "removed": 0}
        raise
    length = int(info.get("length", 0))
    added = int(info.get("entries-added", length))
    return {"length": length, "entries_added": added, "removed": added - length}


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
