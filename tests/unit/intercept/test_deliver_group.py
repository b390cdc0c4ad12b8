"""The delivery worker's start on a fresh Redis: the claimer waits for the consumer group.

The reader creates the group (XGROUP CREATE) while the claimer starts XAUTOCLAIM on another
connection; on a Redis Cluster the XAUTOCLAIM often arrived first and failed with NOGROUP (a
Redis error counted and logged at every start, which also muted real Redis warnings for 10 s).
Here the XGROUP CREATE is held back on a real redis-server, so the order is forced.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aredis

from intercept import names
from intercept.delivery.worker import DeliveryWorker, Settings
from ops.procs import free_port


class SlowGroupCreate(aredis.Redis):
    """A real client whose XGROUP CREATE is sent 0.5 s late."""

    async def xgroup_create(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await super().xgroup_create(*args, **kwargs)


def test_claimer_waits_for_the_group_the_reader_creates(redis_url: str) -> None:
    async def run() -> tuple[int, int]:
        client = SlowGroupCreate.from_url(redis_url)
        settings = Settings(redis_url=redis_url, sip_port=free_port("127.0.0.1", "udp"),
                            consumer="t", claim_idle=0.6, grace=0.1)  # claimer every 0.2 s
        worker = DeliveryWorker(settings, client)
        try:
            await worker.start()
            await asyncio.sleep(1.2)
            groups = await client.xinfo_groups(names.EVENTS)
        finally:
            await worker.stop()
            await client.aclose()
        return worker.stats.redis_errors, len(groups)

    errors, groups = asyncio.run(run())
    assert groups == 1
    assert errors == 0
