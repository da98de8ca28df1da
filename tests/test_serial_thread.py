"""store.serial_thread: calls run one at a time, in order, off the loop, and answer on the loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fastetcd.store.serial_thread import SerialThread


def test_calls_run_in_order_on_one_other_thread_and_answer_on_the_loop():
    seen: list[tuple[int, int]] = []

    def call(i: int) -> int:
        time.sleep(0.001 * (5 - i % 5))  # later calls are quicker: order must not come from timing
        seen.append((i, threading.get_ident()))
        return i * i

    async def body():
        t = SerialThread("test")
        try:
            futs = [t.run(call, i) for i in range(20)]
            return await asyncio.gather(*futs)
        finally:
            t.stop()

    assert asyncio.run(body()) == [i * i for i in range(20)]
    assert [i for i, _ in seen] == list(range(20))
    threads = {tid for _, tid in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_an_exception_reaches_its_caller_and_the_thread_goes_on():
    def boom() -> None:
        raise ValueError("no")

    async def body():
        t = SerialThread("test")
        try:
            with pytest.raises(ValueError, match="no"):
                await t.run(boom)
            return await t.run(lambda: "still here")
        finally:
            t.stop()

    assert asyncio.run(body()) == "still here"


def test_a_cancelled_call_still_runs_and_stop_waits_for_queued_calls():
    gate = threading.Event()
    ran: list[str] = []

    async def body():
        t = SerialThread("test")
        first = t.run(gate.wait)
        second = t.run(ran.append, "cancelled but queued")
        second.cancel()
        gate.set()
        await first
        t.stop()

    asyncio.run(body())
    assert ran == ["cancelled but queued"]


def test_posted_calls_run_in_order_with_the_others_and_a_failing_one_is_logged(caplog):
    ran: list[int] = []

    def boom() -> None:
        raise ValueError("posted and failed")

    async def body():
        t = SerialThread("test")
        try:
            t.post(ran.append, 1)
            t.post(boom)
            t.post(ran.append, 2)
            return await t.run(lambda: list(ran))
        finally:
            t.stop()

    with caplog.at_level("ERROR", logger="fastetcd.store.serial_thread"):
        assert asyncio.run(body()) == [1, 2]
    assert any(r.exc_info and "posted and failed" in str(r.exc_info[1]) for r in caplog.records)
