"""The durable delivery worker of issue 5 (item 6), split into small modules.

The proxy only appends already-encrypted events to a Redis stream; everything that can be slow
or fail (the recorder is down, the network drops a datagram, a subscription expires) happens here,
in our own asyncio process, so that the target's call never waits for delivery.

* `policy`  -- pure rules: the back-off schedule, subscription expiry, the recorder allow-list,
  the subscription record kept in Redis;
* `digest`  -- RFC 2617 digest authentication of SUBSCRIBE (realm ``spitwall``);
* `sipua`   -- the SIP endpoint: the PUBLISH/NOTIFY client transactions (Timer E/F) over the
  transport each request's URI and size call for (UDP, TCP, TLS), the server transactions of
  SUBSCRIBE/OPTIONS (UDP), and the message builders;
* `stream`  -- TCP/TLS: persistent outbound connections, RFC 3261 18.3 framing, the TLS context;
* `worker`  -- the consumer group member: reads, reclaims, delivers in order per destination,
  retries, dead-letters, and serves ``Event: srtp`` subscriptions.

`intercept.deliver` is the entry point (`main`, `replay`).
"""
