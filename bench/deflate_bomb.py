"""Deflate bombs against a running node: RSS stays bounded.

Ten associations at once (the default `node.max_associations`), each sending one Deflated Explicit VR
Little Endian instance of about 3 MiB that inflates to about 3 GiB (a real phantom slice's header followed
by private elements of zeros; `tests/crafted.py:deflate_bomb`). The node inflates while it walks the
dataset, in chunks of at most 1 MiB, and refuses each bomb once the inflated size passes
`node.max_instance_mb` (default 2048 MiB) with 0xC212.

Reference run, side by side: the same ten associations each sending one valid deflated 512 x 512 phantom
slice. Each run gets a fresh `qa-node serve`; peak RSS is the kernel's VmHWM of the node process.
Target: peak RSS < 1 GB with ten bombs at once (before issue 12, one bomb took the node from 241 MB to
6.5 GB for 18 s).

    .venv/bin/python bench/deflate_bomb.py [--bombs 10] [--gib 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.crafted import CT_IMAGE, DEFLATED, deflate_bomb, encode, header_of, write_instance  # noqa: E402
from tests.helpers import PHANTOM_5MM, NodeProcess, write_config  # noqa: E402


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def send_all(port: int, files: list[Path]) -> tuple[list[int | None], float]:
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # the files' own bytes, as a hostile SCU sends them
    statuses: list[int | None] = [None] * len(files)
    barrier = threading.Barrier(len(files))

    def one(i: int) -> None:
        ae = AE(ae_title="CT1")
        ae.dimse_timeout = ae.network_timeout = 600
        ae.add_requested_context(CT_IMAGE, [DEFLATED])
        assoc = ae.associate("127.0.0.1", port, ae_title="CTQA")
        if not assoc.is_established:
            return
        barrier.wait()
        rsp = assoc.send_c_store(files[i])
        statuses[i] = int(rsp.Status) if "Status" in rsp else None
        assoc.release()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, time.perf_counter() - t0


def run(label: str, files: list[Path], work: Path) -> dict:
    work.mkdir()
    node = NodeProcess(write_config(work / "config.toml", data_dir=work / "var", stable_age_s=600), work)
    node.start()
    try:
        pid = node.proc.pid
        time.sleep(2.0)  # let start-up settle (imports, database, scheduler)
        idle = rss_mb(pid, "VmRSS")
        statuses, seconds = send_all(node.port, files)
        peak = rss_mb(pid, "VmHWM")
        after = rss_mb(pid, "VmRSS")
        kept = len(list((work / "var" / "store").rglob("*.dcm")))
        spool = len(list((work / "var" / "spool").iterdir()))
        alive = node.proc.poll() is None
    finally:
        node.stop()
    return dict(label=label, idle=idle, peak=peak, after=after, seconds=seconds, kept=kept, spool=spool,
                alive=alive, statuses=statuses)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bombs", type=int, default=10)
    ap.add_argument("--gib", type=float, default=3.0, help="inflated size of each bomb")
    args = ap.parse_args()
    src = PHANTOM_5MM / "I10"
    if not src.exists():
        print(f"shared data {src} absent", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ctqa-bomb-") as tmp:
        tmp = Path(tmp)
        ds, header = header_of(src)
        bomb = deflate_bomb(header, int(args.gib * (1 << 30)))
        bombs = [write_instance(tmp / f"bomb{i}.dcm", bomb, DEFLATED, CT_IMAGE, f"2.25.99{i}")
                 for i in range(args.bombs)]
        valid = []
        for i in range(args.bombs):
            d = pydicom.dcmread(src)
            d.SOPInstanceUID = f"2.25.88{i}"
            valid.append(write_instance(tmp / f"valid{i}.dcm", encode(d, DEFLATED), DEFLATED, CT_IMAGE, d.SOPInstanceUID))
        print(f"bomb: {len(bomb) / (1 << 20):.1f} MiB deflated, {args.gib:.1f} GiB inflated; "
              f"valid slice: {valid[0].stat().st_size / (1 << 20):.2f} MiB deflated, 0.50 MiB inflated")
        ref = run("reference: valid slices", valid, tmp / "ref")
        hit = run("deflate bombs", bombs, tmp / "bomb")
    print(f"{'run':<24} {'idle RSS MB':>11} {'peak RSS MB':>11} {'peak-idle':>9} {'seconds':>8}  statuses, stored, spool left, node up")
    for r in (ref, hit):
        sts = ",".join(sorted({f"0x{s:04X}" if s is not None else "none" for s in r["statuses"]}))
        print(f"{r['label']:<24} {r['idle']:>11.0f} {r['peak']:>11.0f} {r['peak'] - r['idle']:>9.0f} "
              f"{r['seconds']:>8.1f}  {sts} x{len(r['statuses'])}, {r['kept']} stored, {r['spool']} spool, "
              f"{'up' if r['alive'] else 'DOWN'}")
    ratio = hit["peak"] / ref["peak"]
    ok = hit["peak"] < 1000 and all(s == 0xC212 for s in hit["statuses"]) and hit["kept"] == 0 and hit["alive"]
    print(f"peak RSS with {args.bombs} bombs at once: {hit['peak']:.0f} MB = {ratio:.2f} x the reference run "
          f"(target < 1000 MB): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
