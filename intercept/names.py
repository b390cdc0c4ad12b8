"""Redis key names of the intercept and recording state (a contract, like `scoring.keys`).

Every key starts with `spitwall:li:` so one ACL key pattern covers them: the proxy role reads
targets and appends events, the delivery role consumes the event stream, the intercept admin
manages targets and recorders, and the ops role has key patterns that exclude this prefix (see
`intercept.acl`). Hash tags: `{li}` holds the provisioning state (targets, recorders, version,
audit: changed together), `{ev}` the event streams (written on every target call, consumed by
the delivery worker), so the two can live on different Redis Cluster nodes.
"""

from __future__ import annotations

PREFIX = "spitwall:li:"

#: hash: LIID -> msgpack target record (`intercept.targets.Target.pack`)
TARGETS = f"{PREFIX}{{li}}:targets"
#: integer, incremented on every change of TARGETS (the proxy reloads when it changes)
VERSION = f"{PREFIX}{{li}}:version"
#: stream, append-only: every provisioning action and every refused SUBSCRIBE
AUDIT = f"{PREFIX}{{li}}:audit"
#: hash: recorder address ("ip" or "ip:port") -> msgpack record, allowed to SUBSCRIBE
RECORDERS = f"{PREFIX}{{li}}:recorders"
#: hash: subscription id -> msgpack subscription state (kept by the delivery worker)
SUBSCRIPTIONS = f"{PREFIX}{{li}}:subs"

#: stream of encrypted events waiting for delivery (written by the proxy, XADD only)
EVENTS = f"{PREFIX}{{ev}}:events"
#: consumer group of the delivery workers on EVENTS
EVENTS_GROUP = "deliver"
#: stream of events that failed delivery too often; `spitwall deliver replay` re-queues them
DEAD = f"{PREFIX}{{ev}}:dead"
#: hash: counters of the delivery worker (delivered, retried, dead, ...)
DELIVERY_STATS = f"{PREFIX}{{ev}}:stats"

#: fields of one EVENTS entry (all values are bytes/str; `body` is DER S/MIME, never plaintext)
EVENT_FIELDS = (
    "v",        # entry format version, "1"
    "id",       # event id (32 hex), unique; recipients drop repeats
    "liid",     # case id
    "mode",     # intercept | recording
    "kind",     # keys | call
    "event",    # Keys, Origination, TerminationAttempt, Answer, Release, ReKey
    "dest",     # SIP URI to PUBLISH to, or "subscribe" (NOTIFY to the LIID's subscribers)
    "ts",       # unix time the proxy produced the event, seconds with ms
    "ctype",    # Content-Type of `body` (S/MIME enveloped-data)
    "body",     # the encrypted event
)
EVENT_VERSION = "1"
