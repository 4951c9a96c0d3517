"""Where one association's time goes, per slice: the node (``node.service.Node`` in this process)
or the minimal pynetdicom SCP of bench/ingest.py, pushed the shared series by DCMTK storescu.

pynetdicom's socket, DIMSE and the node's storing are wrapped with timestamps; per slice it prints
the median of: arrive (first byte read after the previous response -> dataset complete), queue
(complete -> C-STORE handler starts: pynetdicom's association thread looks every ~1 ms), handler
(the EVT_C_STORE handler: for the node, waiting for the storing started at completion), reply
(handler returns -> response on the socket: pynetdicom encodes the C-STORE-RSP) and client
(response sent -> next first byte: storescu reads its next file); for the node also the storing's
parts (the walk and checks, the rename and both flushes, the whole store_file) wherever they run.
The wrappers cost a few microseconds per call; figures are wall-clock under the load printed.

    .venv/bin/python bench/ingest_breakdown.py node|minimal [--rounds 2] [--series FOLDER]
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import ingest as bench  # noqa: E402
from pynetdicom import dimse, transport  # noqa: E402

from tests.helpers import write_config  # noqa: E402

pc = time.perf_counter
EVENTS: list[tuple[float, str]] = []
PARTS: dict[str, list[float]] = collections.defaultdict(list)
_after_send = [True]


def _instrument() -> None:
    recv, send = transport.AssociationSocket.recv, transport.AssociationSocket.send
    receive = dimse.DIMSEServiceProvider.receive_primitive

    def t_recv(self, n):
        if _after_send[0]:
            EVENTS.append((pc(), "first_recv"))
            _after_send[0] = False
        return recv(self, n)

    def t_send(self, data):
        out = send(self, data)
        EVENTS.append((pc(), "sent"))
        _after_send[0] = True
        return out

    def t_receive(self, primitive):
        queued = self.msg_queue.qsize()
        out = receive(self, primitive)
        if self.msg_queue.qsize() > queued:
            EVENTS.append((pc(), "complete"))
        return out

    transport.AssociationSocket.recv, transport.AssociationSocket.send = t_recv, t_send
    dimse.DIMSEServiceProvider.receive_primitive = t_receive


def _timed(owner, name: str, key: str) -> None:
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = pc()
        try:
            return fn(*args, **kwargs)
        finally:
            PARTS[key].append(pc() - t0)

    setattr(owner, name, wrapper)


def _handler_marks(fn):
    def wrapper(*args, **kwargs):
        EVENTS.append((pc(), "h0"))
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((pc(), "h1"))
    return wrapper


def _node_receiver(work: Path):
    import scp.ingest as ingest
    import scp.server as server
    from node.cli import setup_logging
    from node.config import load_settings
    from node.service import Node

    server.StorageSCP._on_store = _handler_marks(server.StorageSCP._on_store)
    _timed(ingest, "read_instance_info", "walk+checks")
    _timed(ingest.Ingestor, "_place", "rename+flushes")
    _timed(ingest.Ingestor, "store_file", "store_file")

    def start():
        d = Path(tempfile.mkdtemp(dir=work))
        cfg = write_config(d / "config.toml", data_dir=d / "var", stable_age_s=600)
        setup_logging("WARNING")
        node = Node(load_settings(cfg))
        return node, node.start(), "CTQA"

    return start, lambda node: node.stop()


def _minimal_receiver(work: Path):
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import CTImageStorage

    _config.STORE_RECV_CHUNKED_DATASET = True

    def on_open(event):  # as bench/ingest.py's minimal SCP
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        event.assoc.dul._run_loop_delay = 0.0001

    @_handler_marks
    def on_store(event):
        os.unlink(event.dataset_path)
        return 0x0000

    def start():
        ae = AE(ae_title="MINIMAL")
        ae.maximum_pdu_size = 1048576
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        srv = ae.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])
        return srv, srv.server_address[1], "MINIMAL"

    return start, lambda srv: srv.shutdown()


SEGMENTS = (("arrive", "first_recv", "complete"), ("queue", "complete", "h0"), ("handler", "h0", "h1"),
            ("reply", "h1", "sent"), ("client", "sent", "first_recv"))


def _segments() -> dict[str, list[float]]:
    """Per slice: the first occurrence of each mark from one first byte to the next."""
    out: dict[str, list[float]] = collections.defaultdict(list)
    slices, cur = [], None
    for t, kind in EVENTS:
        if kind == "first_recv":
            if cur is not None:
                slices.append(cur)
            cur = {"first_recv": t}
        elif cur is not None and kind not in cur:
            cur[kind] = t
    for a, b in zip(slices, slices[1:] + [None]):
        if not all(k in a for k in ("complete", "h0", "h1", "sent")):
            continue  # (the association's own PDUs)
        for name, start, end in SEGMENTS[:4]:
            out[name].append(a[end] - a[start])
        if b is not None:
            out["client"].append(b["first_recv"] - a["sent"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("receiver", choices=("node", "minimal"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--series", type=Path, default=bench.SHARED_SERIES)
    args = ap.parse_args()
    n = sum(1 for p in args.series.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md"))
    _instrument()
    with tempfile.TemporaryDirectory(prefix="ctqa-breakdown-", dir=REPO / "var" if (REPO / "var").exists() else None) as tmp:
        start, stop = (_node_receiver if args.receiver == "node" else _minimal_receiver)(Path(tmp))
        for r in range(args.rounds):
            obj, port, called = start()
            time.sleep(2)
            EVENTS.clear()
            PARTS.clear()
            dt = bench.push(port, args.series, called)
            stop(obj)
            seg = _segments()
            line = "; ".join(f"{k} {1e3 * statistics.median(v):.2f}" for k, v in seg.items() if v)
            parts = "; ".join(f"{k} {1e3 * statistics.median(v):.2f}" for k, v in PARTS.items())
            print(f"{args.receiver} round {r + 1}: {n / dt:.1f} slices/s = {1e3 * dt / n:.2f} ms/slice; medians ms: "
                  f"{line}" + (f" | storing: {parts}" if parts else "") + f"  ({bench.load_note()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
