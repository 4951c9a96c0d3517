"""The worker processes' wake-up of the receiving node's outbox sender (node.workers.OutboxWake and
OutboxWakeListener): a datagram calls the listener's callback; datagrams arriving together call it
once; a wake with no listener is silent."""

from __future__ import annotations

import threading
import time

from node.workers import OutboxWake, OutboxWakeListener
from tests.helpers import wait_until


def test_a_datagram_wakes_the_sender_and_a_burst_wakes_it_once():
    calls: list[float] = []
    gate = threading.Event()

    def on_wake():
        calls.append(time.monotonic())
        gate.wait(5)  # the first pass is still running while more datagrams arrive

    listener = OutboxWakeListener(on_wake).start()
    try:
        wake = OutboxWake(listener.port)
        wake()
        wait_until(lambda: len(calls) == 1, timeout=5, what="the first wake")
        for _ in range(5):  # five jobs finish during that pass
            wake()
        time.sleep(0.2)
        gate.set()
        wait_until(lambda: len(calls) == 2, timeout=5, what="one more pass for the burst")
        time.sleep(0.7)  # (longer than the listener's select timeout)
        assert len(calls) == 2
    finally:
        listener.stop()
    port = listener.port
    OutboxWake(port)()  # nobody listens any more: no error, nothing waits
    assert len(calls) == 2
