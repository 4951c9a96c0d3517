"""What every association of the node (the storage SCP's, the outbox sender's) sets when its TCP
connection opens (EVT_CONN_OPEN)."""

from __future__ import annotations

import socket

# pynetdicom's DUL thread sleeps 1 ms whenever it finds no event; between two C-STOREs that idle
# sleep alone costs ~20% of the throughput. 0.1 ms keeps latency low at little CPU.
DUL_LOOP_DELAY_S = 0.0001


def on_conn_open(event) -> None:
    """TCP_NODELAY on the association's socket (pynetdicom never sets it: without it every small PDU,
    a C-STORE-RSP or the next C-STORE's command, waits ~40 ms for a delayed ACK (Nagle), which caps a
    pass at ~20 objects/s) and the DUL loop delay above."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S
