"""Size of the objects the node writes back beside the images they describe: the shared 140-slice
1 mm head phantom series (or ``--series DIR``) through analysis (basic + classical; ``--n2q`` adds
the N2Q map) and ``node.outputs.build_outputs``. Prints the bytes of the images, of each output as
written (DICOM file format) and the ratio map bytes / image bytes (the issue's target: < 1), beside
the float32 map at the source matrix the node wrote before (the reference).

    .venv/bin/python bench/output_sizes.py [--series DIR] [--n2q]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.helpers import PHANTOM_1MM  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=PHANTOM_1MM)
    ap.add_argument("--n2q", action="store_true", help="also run N2Q (its map at 256 x 256)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from analysis.pipeline import analyse_series
    from analysis.results import RunContext
    from node.outputs import build_outputs

    files = sorted(p for p in args.series.iterdir() if p.is_file() and p.name != "LICENSE")
    models = ["basic", "classical"] + (["n2q"] if args.n2q else [])
    result = analyse_series(files, models, RunContext(device="cpu"))
    if result.status != "done":
        print(f"series not analysed: {result.status} {result.reason}")
        return 1
    images = sum(p.stat().st_size for p in files)
    vol = result.volume
    float_ref = vol.n_slices * vol.hu.shape[1] * vol.hu.shape[2] * 4
    built = build_outputs(result, "CT1", uid_seed="bench")
    print(f"series: {len(files)} files, {vol.hu.shape[1]} x {vol.hu.shape[2]}, images {images / 1e6:.1f} MB")
    maps = 0
    for kind, ds in built.objects:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        n = len(buf.getvalue())
        extra = ""
        if kind == "pmap":
            maps += n
            extra = (f"  {ds.Rows} x {ds.Columns} uint16; float32 at the source matrix (reference): "
                     f"{float_ref / 1e6:.1f} MB, ratio {n / float_ref:.3f}")
        print(f"{kind:5s} {ds.SeriesDescription[:40]:40s} {n / 1e6:8.2f} MB{extra}")
    print(f"maps / images: {maps / images:.3f} (target < 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
