"""Time to build the outputs of one analysed series (``node.outputs.build_outputs``: SR, maps, PDF)
with the SR builder the node has and with the one it had before (every item by highdicom's
templates, the document by Comprehensive3DSR from the whole tree: tests/unit/sr_reference.py),
side by side with the ratio. The shared 140-slice 1 mm head phantom (or ``--series DIR``) is
analysed once (basic + classical); then ``--repeat`` rounds of each builder, alternating, best and
median wall time, and the SR alone. The two SRs are compared byte for byte as written (tracking
UIDs numbered, clock-set dates fixed); ``--write DIR`` saves both (for dciodvfy).

    flock /tmp/team/heavy.lock .venv/bin/python bench/outputs_speed.py [--series DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.helpers import PHANTOM_1MM  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=PHANTOM_1MM)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", type=Path, help="save the new and the reference SR here (sr_new.dcm, sr_reference.dcm)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    import node.outputs as outputs
    from analysis.pipeline import analyse_series
    from analysis.results import RunContext
    from reports.sr import build_measurement_report
    from tests.unit.sr_reference import build_measurement_report_reference, encoded

    files = sorted(p for p in args.series.iterdir() if p.is_file() and p.name != "LICENSE")
    result = analyse_series(files, ["basic", "classical"], RunContext(device="cpu"))
    if result.status != "done":
        print(f"series not analysed: {result.status} {result.reason}")
        return 1
    builders = {"new": build_measurement_report, "reference": build_measurement_report_reference}
    sr_times: dict[str, list[float]] = {k: [] for k in builders}

    def timed_sr(kind):
        def build(*a, **kw):
            t = time.perf_counter()
            sr = builders[kind](*a, **kw)
            sr_times[kind].append(time.perf_counter() - t)
            return sr
        return build

    def run(kind: str):
        outputs.build_measurement_report = timed_sr(kind)
        t = time.perf_counter()
        built = outputs.build_outputs(result, "CT1", uid_seed="bench")
        return time.perf_counter() - t, built

    run("new")  # warm-up: first-use costs (highdicom's module tables, imports) are not the builder's
    totals: dict[str, list[float]] = {k: [] for k in builders}
    for k in sr_times.values():
        k.clear()
    srs = {}
    for _ in range(args.repeat):
        for kind in builders:
            dt, built = run(kind)
            totals[kind].append(dt)
            srs[kind] = dict(built.objects)["sr"]
    outputs.build_measurement_report = build_measurement_report
    data = {kind: encoded(sr) for kind, sr in srs.items()}
    t = time.perf_counter()
    encoded(srs["new"])
    encode_s = time.perf_counter() - t

    print(f"series: {len(files)} files, {args.repeat} rounds each, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'':28s} {'new':>8s} {'reference':>10s} {'new/ref':>8s}")
    for label, values in (("build_outputs best (s)", {k: min(v) for k, v in totals.items()}),
                          ("build_outputs median (s)", {k: statistics.median(v) for k, v in totals.items()}),
                          ("SR alone median (s)", {k: statistics.median(v) for k, v in sr_times.items()})):
        new, ref = values["new"], values["reference"]
        print(f"{label:28s} {new:8.2f} {ref:10.2f} {new / ref:8.2f}")
    print(f"SR written: {len(data['new']) / 1e6:.2f} MB, encoding it {encode_s:.2f} s (write_outputs, not above)")
    same = data["new"] == data["reference"]
    print(f"SR identical to the reference's, byte for byte: {'yes' if same else 'NO'}")
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        for kind, b in data.items():
            (args.write / f"sr_{kind}.dcm").write_bytes(b)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
