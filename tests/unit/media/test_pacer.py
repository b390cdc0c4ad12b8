"""The RTP pacer: deadlines served by its timer or by any callback that runs first."""

from __future__ import annotations

import asyncio

from media.session import Pacer, pacer_for


def test_sends_in_deadline_order_on_its_own_timer() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(loop)
        t0 = loop.time()
        got: list[tuple[str, float]] = []
        for name, dt in (("c", 0.06), ("a", 0.02), ("b", 0.04)):
            def send(n: str = name, d: float = dt) -> None:
                got.append((n, loop.time() - (t0 + d)))

            pacer.at(t0 + dt, send)
        await asyncio.sleep(0.12)
        return got

    got = asyncio.run(main())
    assert [n for n, _ in got] == ["a", "b", "c"]
    assert all(late >= 0 for _, late in got)  # never early


def test_overdue_send_goes_out_from_another_callback_and_the_timer_rearms() -> None:
    """run_due from a busy path sends what is due; the pacer's timer, which then finds nothing
    due, must still arm itself for the next deadline (a chain must never stall)."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(loop)
        got: list[str] = []
        t0 = loop.time()

        def chain(i: int) -> None:
            got.append(f"p{i}")
            if i < 4:
                pacer.at(t0 + 0.02 * (i + 1), lambda: chain(i + 1))

        pacer.at(t0, lambda: chain(0))
        await asyncio.sleep(0.001)
        # a busy loop: 30 ms without yielding, then someone calls run_due first
        end = loop.time() + 0.03
        while loop.time() < end:
            pass
        pacer.run_due()
        assert got[:2] == ["p0", "p1"]
        await asyncio.sleep(0.15)
        return got

    assert asyncio.run(main()) == ["p0", "p1", "p2", "p3", "p4"]


def test_a_failing_send_does_not_stop_the_others() -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        pacer = pacer_for(loop)
        assert pacer_for(loop) is pacer
        got: list[int] = []

        def boom() -> None:
            raise OSError("network down")

        now = loop.time()
        pacer.at(now, boom)
        pacer.at(now, lambda: got.append(1))
        await asyncio.sleep(0.01)
        return got

    assert asyncio.run(main()) == [1]
